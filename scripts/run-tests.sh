#!/usr/bin/env bash
# Runs every test: ctest and the Python tests (numpy reference, later real
# clients) on the Release and the ASan+UBSan builds, and each libFuzzer
# target for a bounded time. Ends with one line
# "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
REL=${1:-build}
ASAN=${2:-build-asan}
FUZZ_SECONDS=${3:-60}
passed=0
failed=0
failures=()

step() { # name, command...
    local name=$1
    shift
    echo
    echo "=== $name"
    if "$@"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failures+=("$name")
    fi
}

step "ctest (Release)" ctest --test-dir "$REL" --output-on-failure --timeout 900
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
step "ctest (ASan+UBSan)" env TANDEM_TEST_SANITIZED=1 ctest --test-dir "$ASAN" --output-on-failure --timeout 1800
unset ASAN_OPTIONS UBSAN_OPTIONS

if [ -x .venv/bin/python ]; then
    step "python tests (Release)" env TANDEM_BIN="$PWD/$REL/bin/tandem" \
        .venv/bin/python -m pytest -q -p no:cacheprovider tests/python
    step "python tests (ASan+UBSan)" env TANDEM_BIN="$PWD/$ASAN/bin/tandem" \
        ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        .venv/bin/python -m pytest -q -p no:cacheprovider tests/python
else
    echo "python tests: no .venv (run make deps)"; failed=$((failed + 1)); failures+=("python tests")
fi

fuzz() { # target, corpus dir
    local bin="$ASAN/bin/$1" corpus=$2 work
    [ -x "$bin" ] || { echo "$1: not built"; return 1; }
    work=$(mktemp -d)
    cp -r "$corpus"/. "$work"/ 2>/dev/null || true
    "$bin" -max_total_time="$FUZZ_SECONDS" -print_final_stats=0 -close_fd_mask=3 "$work" \
        >"$work.log" 2>&1
    local rc=$?
    tail -n 3 "$work.log"
    [ $rc -ne 0 ] && tail -n 60 "$work.log"
    rm -rf "$work" "$work.log"
    return $rc
}
step "fuzz gguf (${FUZZ_SECONDS}s)" fuzz fuzz_gguf tests/fuzz/corpus/gguf
step "fuzz kv_message (${FUZZ_SECONDS}s)" fuzz fuzz_kv_message tests/fuzz/corpus/kv_message
step "fuzz kv_codec (${FUZZ_SECONDS}s)" fuzz fuzz_kv_codec tests/fuzz/corpus/kv_codec
step "fuzz cluster_message (${FUZZ_SECONDS}s)" fuzz fuzz_cluster_message tests/fuzz/corpus/cluster
step "fuzz handshake (${FUZZ_SECONDS}s)" fuzz fuzz_handshake tests/fuzz/corpus/handshake
vocab=../shared/testdata/tokenizer/ggml-vocab-starcoder.gguf
if [ -f "$vocab" ]; then
    export TANDEM_FUZZ_VOCAB=$PWD/$vocab
    step "fuzz tokenizer (${FUZZ_SECONDS}s)" fuzz fuzz_tokenizer tests/fuzz/corpus/tokenizer
else
    echo "fuzz tokenizer: skipped, ../shared/testdata is not present in this checkout"
fi

echo
if [ $failed -gt 0 ]; then
    echo "failed: ${failures[*]}"
fi
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
