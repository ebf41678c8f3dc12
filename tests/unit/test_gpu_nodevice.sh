#!/usr/bin/env bash
# What a GPU run needs, checked on a machine without a GPU:
#  1. tests/gpu/run.sh, every stage, with this build's binaries standing in
#     for the prebuilt ones: exit 77, and a status file whose every item
#     says no-device (each GPU test starts and says "no CUDA device");
#  2. the same binaries on a machine that looks like it has a GPU (a fake
#     nvidia-smi): their exit 77 is a failure there, and run.sh exits 1;
#  3. a test that exits 77 without saying why, or crashes: a failure;
#  4. tests/gpu/prepare-deps.sh, then a configure that sees only what it
#     fetched (PKG_CONFIG_LIBDIR): succeeds; without LZ4's .pc: fails.
# Skips (77) on a machine with a GPU: there, run tests/gpu/run.sh itself.
set -u
BIN=${TANDEM_BIN_DIR:?}
SRC=${TANDEM_SOURCE_DIR:?}
. "$SRC/tests/unit/lib/check.sh"
if command -v nvidia-smi > /dev/null && nvidia-smi -L 2> /dev/null | grep -q '^GPU '; then
    echo "SKIP: this machine has a GPU: run tests/gpu/run.sh"
    exit 77
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
RUN="$SRC/tests/gpu/run.sh"
cuda_built=0
[ -x "$BIN/test_cuda_ops" ] && cuda_built=1

# 1. no GPU: every stage says so
OUT=$dir/out1 TANDEM_GPU_BIN=$BIN timeout 300 "$RUN" all bench bench-f16 > "$dir/run1.log" 2>&1
rc=$?
check "run.sh without a GPU exits 77 (got $rc)" test $rc -eq 77
st=$dir/out1/status.txt
check "a status file with an item per test" test "$(wc -l < "$st" 2> /dev/null || echo 0)" -ge 10
check "every item is no-device (or the prebuilt build)" \
    test -z "$(awk '!($3 == "no-device" || ($1 == "build" && $3 == "pass"))' "$st")"
if [ $cuda_built = 1 ]; then
    for t in test_cuda_ops test_cuda_sample test_cuda_model memcheck-ops synccheck-ops ceilings engine-q4_1; do
        check "$t started and said no CUDA device" grep -q "^[a-z0-9-]* $t no-device exit [0-9]*: no CUDA device" "$st"
    done
else
    echo "note: built without CUDA: the GPU tests are absent, run.sh says so"
fi
cat "$st"

# 2. a machine that seems to have a GPU, where the backend cannot start
mkdir -p "$dir/fakebin"
printf '#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-fake)"\n' > "$dir/fakebin/nvidia-smi"
chmod +x "$dir/fakebin/nvidia-smi"
PATH="$dir/fakebin:$PATH" OUT=$dir/out2 TANDEM_GPU_BIN=$BIN timeout 300 "$RUN" ops model \
    > "$dir/run2.log" 2>&1
rc=$?
check "with a GPU present, skipped tests fail the run (exit 1, got $rc)" test $rc -eq 1
check "... and no item says pass or no-device there" \
    test -z "$(awk '$3 == "pass" || $3 == "no-device"' "$dir/out2/status.txt")"
cat "$dir/out2/status.txt"

# 3. tests that exit 77 without a reason, or crash
mkdir -p "$dir/bad"
printf '#!/bin/sh\necho SKIP\nexit 77\n' > "$dir/bad/test_cuda_ops"
printf '#!/bin/sh\nkill -SEGV $$\n' > "$dir/bad/test_cuda_sample"
chmod +x "$dir/bad/"*
OUT=$dir/out3 TANDEM_GPU_BIN=$dir/bad timeout 120 "$RUN" ops > "$dir/run3.log" 2>&1
rc=$?
check "an unexplained 77 and a crash fail the run (exit 1, got $rc)" test $rc -eq 1
check "... both recorded as fail" test "$(awk '$3 == "fail"' "$dir/out3/status.txt" | wc -l)" -eq 2

# 4. the prepare step covers every library CMake requires (once: the
# sanitized build's run of this test leaves it to the Release one)
if [ -n "${TANDEM_TEST_SANITIZED:-}" ]; then
    echo "note: prepare-deps check left to the Release build's run"
elif ! "$SRC/tests/gpu/prepare-deps.sh" "$dir/deps" > "$dir/prep.log" 2>&1; then
    echo "note: cannot fetch Debian packages here (apt-get download failed); prepare-deps not checked:"
    tail -3 "$dir/prep.log"
else
    pc=$dir/deps/usr/lib/x86_64-linux-gnu/pkgconfig
    env -u PKG_CONFIG_PATH PKG_CONFIG_LIBDIR="$pc" cmake -S "$SRC" -B "$dir/cfg" \
        -DTANDEM_CUDA=OFF > "$dir/cfg.log" 2>&1
    check "configure with only prepare-deps' libraries succeeds" test $? -eq 0
    mkdir -p "$dir/nolz4"
    cp "$pc"/*.pc "$dir/nolz4/" && rm -f "$dir/nolz4/liblz4.pc"
    env -u PKG_CONFIG_PATH PKG_CONFIG_LIBDIR="$dir/nolz4" cmake -S "$SRC" -B "$dir/cfg2" \
        -DTANDEM_CUDA=OFF > "$dir/cfg2.log" 2>&1
    check "... and fails without LZ4's (the check can fail)" test $? -ne 0
fi
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
