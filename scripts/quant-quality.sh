#!/usr/bin/env bash
# make quant-quality: how good tandem's quantizer is, against llama.cpp's
# on the same source (issue 15, must-show 3). Run after make test-quants
# (it reuses its cache of llama.cpp-made files).
#
# Source: the exact F32 copy of SmolLM2-135M-Instruct. tandem quantize
# writes Q8_0, Q6_K, Q5_K_M and Q4_K_M without and with an importance
# matrix (tandem imatrix on calibration text: the non-GPL license texts in
# /usr/share/common-licenses); llama.cpp's llama_model_quantize writes the
# same types without one. Every file's perplexity by tandem ppl on GPL-3
# (--ctx 512, the text docs/benchmarks.md uses; not in the calibration
# set). Then llama.cpp runs tandem's Q4_K_M: its greedy answers against
# tandem's on the reference prompts.
# Output: a table, and $BUILD/quant-quality/ppl.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
TANDEM_HOME=${TANDEM_HOME:-$HOME/.cache/tandem}
CACHE=$TANDEM_HOME/quants
T=$BUILD/bin/tandem
out=$BUILD/quant-quality
mkdir -p "$out"
TEXT=${PPL_TEXT:-/usr/share/common-licenses/GPL-3}
f32=$CACHE/smollm2-f32.gguf
[ -f "$f32" ] || { echo "quant-quality: no $f32 (run make test-quants first)"; exit 1; }
calib=$out/calibration.txt
cat /usr/share/common-licenses/{Apache-2.0,MPL-2.0,GFDL-1.3,Artistic,CC0-1.0} > "$calib"
im=$out/smollm2.imatrix.gguf
[ -f "$im" ] || "$T" imatrix -m "$f32" -f "$calib" -o "$im" --ctx 512 2> "$out/imatrix.log"
for t in Q8_0 Q6_K Q5_K_M Q4_K_M; do
    [ -f "$CACHE/smollm2-$t.gguf" ] || .venv-bench/bin/python tests/python/llamacpp_quantize.py "$f32" "$CACHE/smollm2-$t.gguf" "$t" > /dev/null 2>&1
    "$T" quantize "$f32" "$out/tandem-$t.gguf" --type "$t" 2> "$out/quantize-$t.log"
    [ "$t" = Q8_0 ] || "$T" quantize "$f32" "$out/tandem-$t-imatrix.gguf" --type "$t" --imatrix "$im" 2> "$out/quantize-$t-imatrix.log"
done
ppl() { "$T" ppl -m "$1" -f "$TEXT" --ctx 512 2>/dev/null | sed -n 's/.*PPL = \([0-9.]*\) +\/- \([0-9.]*\).*/\1 \2/p'; }
echo "model,maker,imatrix,bytes,ppl,ppl_err" > "$out/ppl.csv"
row() { # LABEL MAKER IMATRIX FILE
    read -r p e < <(ppl "$4")
    printf "%-10s %-10s %-8s %12d  %8s +/- %s\n" "$1" "$2" "$3" "$(stat -c %s "$4")" "$p" "$e"
    echo "$1,$2,$3,$(stat -c %s "$4"),$p,$e" >> "$out/ppl.csv"
}
printf "%-10s %-10s %-8s %12s  %s\n" type maker imatrix bytes "ppl (GPL-3, ctx 512)"
row F32 - - "$f32"
for t in Q8_0 Q6_K Q5_K_M Q4_K_M; do
    row "$t" llama.cpp no "$CACHE/smollm2-$t.gguf"
    row "$t" tandem no "$out/tandem-$t.gguf"
    [ "$t" = Q8_0 ] || row "$t" tandem yes "$out/tandem-$t-imatrix.gguf"
done

echo "== llama.cpp runs tandem's Q4_K_M: greedy answers (32 tokens) against tandem's"
.venv/bin/python - "$T" "$out/tandem-Q4_K_M.gguf" <<'PY'
import json, subprocess, sys, tempfile
sys.path.insert(0, "tests/python")
from test_reference import PROMPTS
tandem, model = sys.argv[1], sys.argv[2]
same = 0
for name, prompt in PROMPTS.items():
    with tempfile.NamedTemporaryFile(suffix=".f32") as f:
        r = subprocess.run([".venv-bench/bin/python", "tests/python/bench_llamacpp.py", "-m", model, "--logits-of", prompt,
                            "-o", f.name, "--greedy", "32", "--flash-attn", "off"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        sys.exit("llama.cpp could not run tandem's file:\n" + r.stderr[-2000:])
    ll = json.loads(r.stdout)["greedy"]
    t = subprocess.run([tandem, "generate", "-m", model, "-p", prompt, "--temp", "0", "-n", "32", "--ignore-eos", "--output-ids"],
                       capture_output=True, text=True, timeout=600)
    tt = [int(x) for x in t.stdout.split()]
    n = next((i for i in range(min(len(ll), len(tt))) if ll[i] != tt[i]), min(len(ll), len(tt)))
    same += n == 32
    print("%-8s llama.cpp and tandem agree on %d of 32 greedy tokens%s" % (name, n, "" if n == 32 else " (first difference at %d)" % n))
print("%d of %d prompts identical" % (same, len(PROMPTS)))
PY
