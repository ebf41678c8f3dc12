#!/usr/bin/env bash
# make test-quants: tandem on GGUF files that llama.cpp itself wrote.
#
# 1. An exact F32 copy of SmolLM2 (tandem quantize --type F32), and a
#    synthetic Llama whose every dimension is a multiple of 256 (tandem
#    mkmodel; SmolLM2's 576 makes llama.cpp fall back to Q5_0/Q8_0 for most
#    matrices, so only the synthetic model uses Q2_K..Q6_K and IQ4_XS
#    everywhere).
# 2. llama.cpp's llama_model_quantize (llama-cpp-python, .venv-bench) writes
#    SmolLM2 in Q4_K_M Q5_K_M Q6_K Q8_0 IQ4_XS BF16 and the synthetic model
#    in Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K IQ4_XS, into $TANDEM_HOME/quants
#    (made once, reused; never in the tree).
# 3. For each file, tests/python/test_reference.py's logits and greedy
#    tests (tandem against the numpy reference on weights dequantized by the
#    PyPI gguf package): relative L2 under 2e-2 with the same argmax, and 32
#    greedy tokens equal (near-tie rule).
# Output: one line per check, and $BUILD/quant-files/report.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
TANDEM_HOME=${TANDEM_HOME:-$HOME/.cache/tandem}
CACHE=$TANDEM_HOME/quants
MODEL=$TANDEM_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf
TANDEM=$BUILD/bin/tandem
out=$BUILD/quant-files
mkdir -p "$CACHE" "$out"
scripts/bench-venv.sh
[ -f "$MODEL" ] || { echo "test-quants: no model at $MODEL (make model)"; exit 1; }

make_file() { # SRC DST TYPE: llama.cpp quantizes SRC into DST once
    if [ ! -f "$2" ]; then
        echo "test-quants: llama.cpp quantizes $(basename "$1") -> $(basename "$2")"
        .venv-bench/bin/python tests/python/llamacpp_quantize.py "$1" "$2" "$3" > "$out/llamacpp-$3.log" 2>&1 ||
            { tail -5 "$out/llamacpp-$3.log"; exit 1; }
    fi
}

f32=$CACHE/smollm2-f32.gguf
[ -f "$f32" ] || "$TANDEM" quantize "$MODEL" "$f32" --type F32 2> "$out/f32.log" ||
    { tail -5 "$out/f32.log"; exit 1; }
synth=$CACHE/synth256-f32.gguf
[ -f "$synth" ] || "$TANDEM" mkmodel -o "$synth" --n-embd 512 --n-ff 1536 --n-layer 4 --n-head 8 \
    --n-head-kv 2 --type f32 --embd-type f32 --vocab-from "$MODEL" --seed 15 > /dev/null
files=()
for t in Q4_K_M Q5_K_M Q6_K Q8_0 IQ4_XS BF16; do
    make_file "$f32" "$CACHE/smollm2-$t.gguf" "$t"
    files+=("$CACHE/smollm2-$t.gguf")
done
for t in Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K IQ4_XS; do
    make_file "$synth" "$CACHE/synth256-$t.gguf" "$t"
    files+=("$CACHE/synth256-$t.gguf")
done

: > "$out/report.txt"
fail=0
for f in "${files[@]}"; do
    types=$(.venv/bin/python -c "
import collections, sys, gguf
r = gguf.GGUFReader(sys.argv[1])
print(' '.join('%s:%d' % kv for kv in sorted(collections.Counter(t.tensor_type.name for t in r.tensors).items())))" "$f")
    echo "== $(basename "$f")  ($types)" | tee -a "$out/report.txt"
    if ! TANDEM_BIN=$TANDEM TANDEM_MODEL=$f timeout 900 .venv/bin/python -m pytest -q -s \
        tests/python/test_reference.py -k "last_position or greedy" -p no:cacheprovider > "$out/run-$(basename "$f" .gguf).log" 2>&1; then
        fail=1
    fi
    grep -E "^\.?(logits|greedy) " "$out/run-$(basename "$f" .gguf).log" | sed 's/^\.//' | sort -u | tee -a "$out/report.txt"
    grep -E "passed|failed|error" "$out/run-$(basename "$f" .gguf).log" | tail -1 | tee -a "$out/report.txt"
done
[ "$fail" = 0 ] && echo "test-quants: every file passed" || echo "test-quants: FAILURES (see $out/report.txt)"
exit $fail
