#!/usr/bin/env bash
# tests/gpu/run.sh [STAGE ...]: what tandem checks on a GPU machine, in
# stages that each fit one device call (under 4 minutes on an H100 from a
# fresh machine; docs/cuda.md gives the exact calls):
#   build     configure and build the CUDA backend, the engine, the tandem
#             tool and the GPU tests (nothing to do with prebuilt binaries)
#   ops       op parity CUDA vs CPU with tails, batch invariance, graphs
#             (test_cuda_ops); the sampler against the host's (test_cuda_sample)
#   model     whole-model logits CPU vs CUDA, chunked prefill bit-identical,
#             graphs on = graphs off bit for bit (test_cuda_model)
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck over the op
#             and sampler tests in quick mode
#   bench     ceilings (bench_cuda: copy bandwidth, cuBLAS) and tandem bench
#             engine on a Llama-3-8B-shaped Q4_1 model, then the table
#   bench-f16 the same on F16 weights
#   all       build ops model sanitize (the default; the bench stages are
#             asked for by name, one per call)
# Binaries: $TANDEM_GPU_BIN if set, else .gpu-prebuilt/bin (made here by
# tests/gpu/prebuild.sh: static CUDA runtime, sm_90, the three Debian
# libraries in .gpu-prebuilt/lib), else build-gpu/bin (the build stage).
# Results: $OUT/status.txt, one line per item: STAGE ITEM RESULT DETAIL,
# RESULT one of pass, fail, no-device (this machine has no GPU), not-run;
# logs and JSON beside it.
# Exit: 0 when every item passed; 77 when this machine has no GPU and every
# item said so (the binaries start and report "no CUDA device"); 1 when
# anything failed, or was skipped or not run on a machine with a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/tandem-gpu}
mkdir -p "$OUT"
STATUS="$OUT/status.txt"
: > "$STATUS"
ARCH=${TANDEM_GPU_ARCH:-90}
JOBS=$(nproc)
STAGE_BUDGET=${TANDEM_GPU_STAGE_SECONDS:-230} # each stage stops its items by then
T0=$(date +%s)
log() { echo "[$(($(date +%s) - T0))s] $*"; }

# ---- where things are ----
if [ -n "${TANDEM_GPU_BIN:-}" ]; then
    B=$TANDEM_GPU_BIN
    PREBUILT=1
elif [ -x .gpu-prebuilt/bin/test_cuda_ops ]; then
    B=$ROOT/.gpu-prebuilt/bin
    PREBUILT=1
    export LD_LIBRARY_PATH="$ROOT/.gpu-prebuilt/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    B=$ROOT/build-gpu/bin
    PREBUILT=0
fi
if [ -d .gpu-deps ]; then # tests/gpu/prepare-deps.sh: for the build stage
    d=$ROOT/.gpu-deps
    export PKG_CONFIG="$d/usr/bin/pkgconf"
    export PKG_CONFIG_LIBDIR="$d/usr/lib/x86_64-linux-gnu/pkgconfig"
    export LD_LIBRARY_PATH="$d/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# cuBLAS for bench_cuda: the toolkit's, or the one Python's wheels carry
for d in /usr/local/cuda/lib64 $(python3 -c 'import nvidia.cublas as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null); do
    [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
export TANDEM_BIN_DIR=$B

HAVE_GPU=0
if command -v nvidia-smi > /dev/null && nvidia-smi -L 2> /dev/null | grep -q '^GPU '; then
    HAVE_GPU=1
    nvidia-smi -L | tee "$OUT/gpu.txt"
elif ls /dev/nvidia[0-9]* > /dev/null 2>&1; then
    HAVE_GPU=1
fi
log "GPU here: $([ $HAVE_GPU = 1 ] && echo yes || echo no); binaries: $B ($([ $PREBUILT = 1 ] && echo prebuilt || echo built here))"

record() { # STAGE ITEM RESULT DETAIL...
    local stage=$1 item=$2 result=$3
    shift 3
    echo "$stage $item $result $*" >> "$STATUS"
    printf '  %-9s %-22s %-9s %s\n' "$stage" "$item" "$result" "$*"
}

stage_start() { STAGE=$1; STAGE_T0=$(date +%s); log "stage $STAGE"; }
left() { echo $((STAGE_BUDGET - ($(date +%s) - STAGE_T0))); }

# run_item ITEM TIMEOUT CMD...: runs CMD with its log in $OUT/ITEM.log and
# records what it means here
run_item() {
    local item=$1 tmo=$2
    shift 2
    local budget
    budget=$(left)
    [ "$tmo" -gt "$budget" ] && tmo=$budget
    if [ "$tmo" -le 5 ]; then
        record "$STAGE" "$item" not-run "the stage's $STAGE_BUDGET s were spent"
        return
    fi
    local a missing=""
    for a in "$@"; do # our binaries among the arguments (a sanitizer runs one)
        case $a in "$B"/*) [ -x "$a" ] || missing=$a ;; esac
    done
    if [ -n "$missing" ]; then
        if [ $HAVE_GPU = 0 ]; then
            record "$STAGE" "$item" no-device "not built here ($missing)"
        else
            record "$STAGE" "$item" not-run "missing: $missing (run the build stage or tests/gpu/prebuild.sh)"
        fi
        return
    fi
    local t0 rc
    t0=$(date +%s)
    timeout "$tmo" "$@" > "$OUT/$item.log" 2>&1
    rc=$?
    local secs=$(($(date +%s) - t0))
    local last
    last=$(grep -E 'FAIL|passed|SKIP|no CUDA device|ERROR|error' "$OUT/$item.log" | tail -1 | cut -c1-160)
    if [ $rc -eq 0 ]; then
        record "$STAGE" "$item" pass "${secs}s ${last}"
    elif [ $rc -eq 124 ]; then
        record "$STAGE" "$item" fail "timed out after ${tmo}s"
        tail -5 "$OUT/$item.log"
    elif [ $HAVE_GPU = 0 ] && grep -q "no CUDA device" "$OUT/$item.log"; then
        record "$STAGE" "$item" no-device "exit $rc: no CUDA device"
    elif [ $HAVE_GPU = 0 ] && grep -q "built without the CUDA backend" "$OUT/$item.log"; then
        record "$STAGE" "$item" no-device "exit $rc: built without the CUDA backend"
    elif [ $rc -eq 77 ]; then
        record "$STAGE" "$item" fail "skipped (exit 77) on a machine with a GPU: ${last}"
        tail -5 "$OUT/$item.log"
    else
        record "$STAGE" "$item" fail "exit $rc: ${last}"
        tail -25 "$OUT/$item.log"
    fi
}

# ---- stages ----

stage_build() {
    stage_start build
    if [ $PREBUILT = 1 ]; then
        record build binaries pass "prebuilt: $B"
        return
    fi
    if [ $HAVE_GPU = 0 ]; then
        record build binaries no-device "no GPU: nothing to build for (tests/gpu/prebuild.sh builds here)"
        return
    fi
    if ! timeout "$(left)" cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DTANDEM_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES="$ARCH" > "$OUT/configure.log" 2>&1; then
        tail -20 "$OUT/configure.log"
        record build configure fail "missing PCRE2/xxHash/LZ4? run tests/gpu/prepare-deps.sh here and carry .gpu-deps"
        return
    fi
    if ! timeout "$(left)" cmake --build build-gpu -j "$JOBS" --target tandem test_cuda_ops \
        test_cuda_sample test_cuda_model bench_cuda > "$OUT/build.log" 2>&1; then
        grep -E "error|Error" "$OUT/build.log" | head -30
        record build compile fail "see build.log"
        return
    fi
    record build binaries pass "sm_$ARCH in $(($(date +%s) - STAGE_T0))s"
}

stage_ops() {
    stage_start ops
    run_item test_cuda_ops 170 "$B/test_cuda_ops"
    run_item test_cuda_sample 60 "$B/test_cuda_sample"
}

stage_model() {
    stage_start model
    run_item test_cuda_model 220 "$B/test_cuda_model"
    if [ -f "$OUT/test_cuda_model.log" ] && grep -q "SmolLM2 not found" "$OUT/test_cuda_model.log"; then
        log "note: SmolLM2 (98 MB) is not on this machine: synthetic models only (a call carries 64 MiB)"
    fi
}

stage_sanitize() {
    stage_start sanitize
    local cs=compute-sanitizer
    if [ $HAVE_GPU = 1 ] && ! command -v $cs > /dev/null; then
        for item in memcheck-ops memcheck-sample racecheck-ops synccheck-ops; do
            record sanitize $item not-run "compute-sanitizer is not on this machine"
        done
        return
    fi
    command -v $cs > /dev/null || cs=env # no GPU: the binaries alone say so
    local san="--error-exitcode 9 --print-limit 20"
    [ $cs = env ] && san=""
    # quick: every kernel configuration and tail, prefill-sized cases
    # included; level 2 (racecheck, synccheck): one case per kernel
    TANDEM_TEST_QUICK=1 run_item memcheck-ops 90 $cs ${san:+--tool memcheck $san} "$B/test_cuda_ops"
    TANDEM_TEST_QUICK=1 run_item memcheck-sample 40 $cs ${san:+--tool memcheck $san} "$B/test_cuda_sample"
    TANDEM_TEST_QUICK=2 run_item racecheck-ops 60 $cs ${san:+--tool racecheck --racecheck-report all $san} "$B/test_cuda_ops"
    TANDEM_TEST_QUICK=2 run_item synccheck-ops 40 $cs ${san:+--tool synccheck $san} "$B/test_cuda_ops"
    # the runtime may refuse the tool on this machine (seen under gVisor)
    for f in "$OUT"/memcheck-ops.log "$OUT"/racecheck-ops.log; do
        [ -f "$f" ] && grep -q "Device not supported" "$f" &&
            log "note: compute-sanitizer says 'Device not supported' here (a gVisor machine?)"
    done
}

stage_bench() { # WEIGHTS
    local t=$1 name=bench
    [ "$t" = q4_1 ] || name=bench-$t
    stage_start $name
    run_item ceilings 40 "$B/bench_cuda" --copy-gib 4 --tokens 2048 --reps 10
    [ -f "$OUT/ceilings.log" ] && grep -E '^\{' "$OUT/ceilings.log" | tail -1 > "$OUT/ceilings.json"
    if [ $HAVE_GPU = 0 ]; then # the tool starts and says why it cannot run
        local tiny=$OUT/tiny.gguf
        "$B/tandem" mkmodel --n-embd 64 --n-ff 128 --n-layer 1 --n-head 2 --n-head-kv 1 \
            --n-vocab 300 -o "$tiny" > /dev/null 2>&1
        run_item "engine-$t" 20 "$B/tandem" bench engine --device cuda -m "$tiny"
        rm -f "$tiny"
        return
    fi
    local m=/tmp/tandem-llama3-8b-$t.gguf
    [ -f "$m" ] || run_item "mkmodel-$t" 90 "$B/tandem" mkmodel --preset llama3-8b --type "$t" \
        --embd-type "$t" -o "$m"
    run_item "engine-$t" 200 "$B/tandem" bench engine --device cuda -m "$m" --prompt-tokens 2048 \
        --max-num-batched-tokens 2048 --gen-tokens 32 --batch-prompt 128 \
        --batches 1,8,32,128 --reps 1 --json
    [ -f "$OUT/engine-$t.log" ] && grep -E '^\{' "$OUT/engine-$t.log" | tail -1 > "$OUT/engine-$t.json"
    python3 tests/gpu/summary.py "$OUT" || true
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
for s in "${stages[@]}"; do
    case $s in
    all) stage_build && stage_ops && stage_model && stage_sanitize ;;
    build) stage_build ;;
    ops) stage_ops ;;
    model) stage_model ;;
    sanitize) stage_sanitize ;;
    bench) stage_bench q4_1 ;;
    bench-f16) stage_bench f16 ;;
    *)
        echo "usage: tests/gpu/run.sh [build|ops|model|sanitize|bench|bench-f16|all ...]" >&2
        exit 2
        ;;
    esac
done

echo
echo "== tandem on the GPU: $STATUS =="
cat "$STATUS"
count() { awk -v r="$1" '$3 == r' "$STATUS" | wc -l; }
n_pass=$(count pass)
n_nodev=$(count no-device)
n_bad=$(($(wc -l < "$STATUS") - n_pass - n_nodev)) # fail, not-run
if [ $HAVE_GPU = 1 ]; then
    [ "$n_bad" -eq 0 ] && [ "$n_nodev" -eq 0 ] && [ "$n_pass" -gt 0 ] && exit 0
    echo "FAILED: $n_bad item(s) failed or did not run, $n_nodev said no device, on a machine with a GPU"
    exit 1
fi
if [ "$n_bad" -gt 0 ]; then
    echo "FAILED: $n_bad item(s) failed or did not run (no GPU on this machine)"
    exit 1
fi
echo "no GPU on this machine: every item that needs one says no device (exit 77)"
exit 77
