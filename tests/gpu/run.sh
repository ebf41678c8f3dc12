#!/usr/bin/env bash
# tests/gpu/run.sh: everything tandem checks on a GPU machine, in one go
# (about 8 minutes on an H100/H200 with 16 cores):
#   1. builds the CUDA backend, the engine and the tandem tool (no UCX, gRPC
#      or libmicrohttpd needed: the network roles are left out)
#   2. op parity CUDA vs CPU on fresh random inputs, batch invariance
#      (tests/gpu/test_cuda_ops.c)
#   3. the GPU sampler against the host sampler, token for token
#      (tests/gpu/test_cuda_sample.c)
#   4. whole-model logits parity CPU vs CUDA and batch invariance
#      (tests/gpu/test_cuda_model.c)
#   5. compute-sanitizer memcheck over the op and sampler tests (quick shapes)
#   6. ceilings: HBM copy bandwidth, cuBLAS GEMM (tests/gpu/bench_cuda.cu)
#   7. tandem bench engine --device cuda on Llama-3-8B-shaped synthetic models
#      (F16 and Q4_1 weights, made by `tandem mkmodel --preset llama3-8b`)
#   8. a short table (tests/gpu/summary.py); JSON and logs in $OUT
# The machine needs nvcc, cmake and python3. Our Debian libraries (PCRE2,
# xxHash, LZ4, pkg-config) come from .gpu-deps, made here by
# tests/gpu/prepare-deps.sh and carried along.
# Env: OUT (results dir), TANDEM_GPU_ARCH (default 90), TANDEM_GPU_SKIP_BENCH=1.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/tandem-gpu}
mkdir -p "$OUT"
ARCH=${TANDEM_GPU_ARCH:-90}
JOBS=$(nproc)
BUILD=build-gpu
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
status_file="$OUT/status.txt"
: > "$status_file"
record() { echo "$1 $2" >> "$status_file"; }

if [ -d .gpu-deps ]; then
    d=$PWD/.gpu-deps
    export PKG_CONFIG="$d/usr/bin/pkgconf"
    export PKG_CONFIG_PATH="$d/usr/lib/x86_64-linux-gnu/pkgconfig"
    export LD_LIBRARY_PATH="$d/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee "$OUT/gpu.txt"

log "build ($BUILD, sm_$ARCH, $JOBS jobs)"
if ! cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DTANDEM_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES="$ARCH" > "$OUT/configure.log" 2>&1; then
    tail -30 "$OUT/configure.log"
    echo "configure failed (missing PCRE2/xxHash/LZ4? run tests/gpu/prepare-deps.sh and carry .gpu-deps)"
    exit 1
fi
if ! cmake --build "$BUILD" -j "$JOBS" --target tandem test_cuda_ops test_cuda_sample test_cuda_model \
        bench_cuda \
        > "$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -40
    exit 1
fi
record build ok
B=$BUILD/bin
export TANDEM_BIN_DIR=$PWD/$B

log "op parity (test_cuda_ops)"
timeout 300 "$B/test_cuda_ops" > "$OUT/test_cuda_ops.log" 2>&1
rc=$?; record test_cuda_ops $rc; tail -60 "$OUT/test_cuda_ops.log"

log "sampler parity (test_cuda_sample)"
timeout 240 "$B/test_cuda_sample" > "$OUT/test_cuda_sample.log" 2>&1
rc=$?; record test_cuda_sample $rc; tail -12 "$OUT/test_cuda_sample.log"

log "model parity (test_cuda_model)"
timeout 300 "$B/test_cuda_model" > "$OUT/test_cuda_model.log" 2>&1
rc=$?; record test_cuda_model $rc; tail -15 "$OUT/test_cuda_model.log"

if command -v compute-sanitizer >/dev/null; then
    log "compute-sanitizer memcheck over the op tests (quick shapes)"
    TANDEM_TEST_QUICK=1 timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 \
        --print-limit 20 "$B/test_cuda_ops" > "$OUT/memcheck.log" 2>&1
    rc=$?; record memcheck $rc; tail -8 "$OUT/memcheck.log"
    TANDEM_TEST_QUICK=1 timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
        --print-limit 20 "$B/test_cuda_sample" > "$OUT/memcheck-sample.log" 2>&1
    rc=$?; record memcheck-sample $rc; tail -4 "$OUT/memcheck-sample.log"
else
    record memcheck missing
fi

if [ "${TANDEM_GPU_SKIP_BENCH:-0}" != 1 ]; then
    log "ceilings (bench_cuda)"
    timeout 120 "$B/bench_cuda" --copy-gib 4 --tokens 2048 > "$OUT/ceilings.json" 2> "$OUT/ceilings.log"
    record ceilings $?
    for t in f16 q4_1; do
        m=/tmp/tandem-llama3-8b-$t.gguf
        log "synthetic Llama-3-8B ($t)"
        [ -f "$m" ] || timeout 300 "$B/tandem" mkmodel --preset llama3-8b --type $t \
            --embd-type $t -o "$m" 2>> "$OUT/mkmodel.log"
        log "bench engine ($t)"
        timeout 300 "$B/tandem" bench engine --device cuda -m "$m" --prompt-tokens 2048 \
            --max-num-batched-tokens 2048 --gen-tokens 64 --batch-prompt 128 \
            --batches 1,8,32,64,128 --reps 2 --json > "$OUT/engine-$t.json" 2> "$OUT/engine-$t.log"
        rc=$?; record "engine-$t" $rc
        [ $rc -eq 0 ] || tail -20 "$OUT/engine-$t.log"
        rm -f "$m" # 16 GB of disk back for the next one
    done
fi
log "done"
python3 tests/gpu/summary.py "$OUT"
