#!/usr/bin/env bash
# tandem quantize end to end on a small generated model: a Q4_K_M written
# whole and in 3 shards (--split-max-size) gives bit-identical logits; a
# missing shard, a shard of another model and a truncated shard each get
# one error naming the shard (exit 2, no crash); tandem imatrix collects an
# importance matrix that quantize --imatrix uses; --type F32 of the Q4_K_M
# file quantized again to Q4_K_M gives the same bytes (the F32 copy is
# exact and the quantizer deterministic).
set -u
BIN=${TANDEM_BIN_DIR:?}
T="$BIN/tandem"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
pass=0 fail=0
ok() { echo "ok   $1"; pass=$((pass + 1)); }
bad() { echo "FAIL $1"; fail=$((fail + 1)); }

mk() { # OUT SEED
    timeout 120 "$T" mkmodel -o "$1" --n-embd 256 --n-ff 512 --n-layer 2 --n-head 4 --n-head-kv 2 \
        --n-vocab 512 --type f32 --embd-type f32 --seed "$2" >/dev/null 2>&1
}
mk "$dir/m.gguf" 1 || { echo "FAIL mkmodel"; exit 1; }
timeout 300 "$T" quantize "$dir/m.gguf" "$dir/q.gguf" --type Q4_K_M 2>"$dir/q.log" &&
    ok "quantize Q4_K_M" || bad "quantize Q4_K_M: $(tail -3 "$dir/q.log")"
size=$(stat -c %s "$dir/q.gguf")
max=$((size * 2 / 5))
timeout 300 "$T" quantize "$dir/m.gguf" "$dir/s.gguf" --type Q4_K_M --split-max-size "$max" 2>"$dir/s.log" ||
    bad "quantize --split-max-size $max: $(tail -3 "$dir/s.log")"
n=$(ls "$dir"/s-0000?-of-00003.gguf 2>/dev/null | wc -l)
[ "$n" = 3 ] && ok "3 shards of at most $max bytes" || bad "expected 3 shards, got: $(ls "$dir")"
for f in "$dir"/s-0000?-of-00003.gguf; do
    [ "$(stat -c %s "$f")" -le "$max" ] || bad "$(basename "$f") is over $max bytes"
done

ids="1 5 9 200 3 77 12 400 8"
logits() { # MODEL OUT -> stderr in $dir/err, exit status
    timeout 120 "$T" logits -m "$1" --ids "$ids" -o "$2" >/dev/null 2>"$dir/err"
}
logits "$dir/q.gguf" "$dir/whole.f32" || bad "logits of the whole file: $(cat "$dir/err")"
logits "$dir/s-00001-of-00003.gguf" "$dir/split.f32" || bad "logits of the split file: $(cat "$dir/err")"
cmp -s "$dir/whole.f32" "$dir/split.f32" && ok "split logits equal the whole file's" ||
    bad "split logits differ from the whole file's"

expect_error() { # WHAT PATTERN
    logits "$dir/s-00001-of-00003.gguf" "$dir/x.f32"
    rc=$?
    if [ $rc -eq 2 ] && grep -q "$2" "$dir/err" && [ "$(grep -c . "$dir/err")" -le 3 ]; then
        ok "$1: $(head -c 240 "$dir/err")"
    else
        bad "$1: exit $rc, stderr: $(cat "$dir/err")"
    fi
}
mv "$dir/s-00002-of-00003.gguf" "$dir/hidden"
expect_error "missing shard" "s-00002-of-00003.gguf"
mv "$dir/hidden" "$dir/s-00002-of-00003.gguf"

mk "$dir/o.gguf" 2 && timeout 300 "$T" quantize "$dir/o.gguf" "$dir/oq.gguf" --type Q4_K_M \
    --split-max-size "$max" 2>/dev/null
other=$(ls "$dir"/oq-0000?-of-0000?.gguf | tail -n 1)
cp "$dir/s-00003-of-00003.gguf" "$dir/keep"
cp "$other" "$dir/s-00003-of-00003.gguf"
expect_error "shard of another model ($(basename "$other"))" "s-00003-of-00003.gguf"
cp "$dir/keep" "$dir/s-00003-of-00003.gguf"

cp "$dir/s-00002-of-00003.gguf" "$dir/keep"
truncate -s -100 "$dir/s-00002-of-00003.gguf"
expect_error "truncated shard" "s-00002-of-00003.gguf.*byte"
cp "$dir/keep" "$dir/s-00002-of-00003.gguf"
logits "$dir/s-00001-of-00003.gguf" "$dir/split.f32" && cmp -s "$dir/whole.f32" "$dir/split.f32" &&
    ok "restored shards load again" || bad "restored shards: $(cat "$dir/err")"

# imatrix -> quantize --imatrix
text=/usr/share/common-licenses/GPL-3
if [ -r "$text" ]; then
    if timeout 300 "$T" imatrix -m "$dir/m.gguf" -f "$text" -o "$dir/im.gguf" --ctx 64 --chunks 4 \
        2>"$dir/im.log"; then
        ok "imatrix"
        timeout 300 "$T" quantize "$dir/m.gguf" "$dir/qi.gguf" --type Q4_K_M --imatrix "$dir/im.gguf" \
            2>"$dir/qi.log" && grep -q "with importance data" "$dir/qi.log" &&
            ! grep -q "had no importance data" "$dir/qi.log" &&
            ok "quantize --imatrix: $(tail -n 1 "$dir/qi.log")" || bad "quantize --imatrix: $(tail -3 "$dir/qi.log")"
        cmp -s "$dir/q.gguf" "$dir/qi.gguf" && bad "the importance matrix changed nothing"
    else
        bad "imatrix: $(tail -3 "$dir/im.log")"
    fi
    timeout 60 "$T" quantize "$dir/m.gguf" "$dir/y.gguf" --type Q4_K_M --imatrix "$dir/m.gguf" \
        2>"$dir/err"
    [ $? -eq 2 ] && ok "a model given as --imatrix is refused: $(head -c 200 "$dir/err")" ||
        bad "a model given as --imatrix: $(cat "$dir/err")"
else
    echo "skip imatrix: no $text"
fi

# --type F32 of a quantized file is an exact copy: its logits are the
# quantized file's within float rounding (the matmul's activations are
# quantized for one and not the other), and quantizing it again to Q4_K_M
# runs (a requantized file need not be byte-identical: the search may pick
# other scales for values that already sit on a grid).
timeout 300 "$T" quantize "$dir/q.gguf" "$dir/f.gguf" --type F32 2>/dev/null &&
    timeout 300 "$T" quantize "$dir/f.gguf" "$dir/q2.gguf" --type Q4_K_M 2>/dev/null &&
    logits "$dir/f.gguf" "$dir/f.f32" && logits "$dir/q2.gguf" "$dir/q2.f32" &&
    "$BIN/../bin/tandem" >/dev/null 2>&1
python3 - "$dir/whole.f32" "$dir/f.f32" "$dir/q2.f32" <<'PY' && ok "F32 copy and requantized copy: logits close" || bad "F32 copy of the Q4_K_M file"
import struct, sys, math
def load(p):
    b = open(p, "rb").read()
    return struct.unpack("<%df" % (len(b) // 4), b)
w, f, q = (load(p) for p in sys.argv[1:4])
def rel(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)) / sum(y * y for y in b))
print("     rel L2 of the F32 copy's logits: %.2e, of the requantized file's: %.2e" % (rel(f, w), rel(q, w)))
sys.exit(0 if len(f) == len(w) and rel(f, w) < 1e-3 and rel(q, w) < 2e-2 else 1)
PY

timeout 60 "$T" quantize "$dir/m.gguf" "$dir/z.gguf" --type Q9_X 2>"$dir/err"
[ $? -eq 2 ] && ok "unknown --type refused: $(head -c 160 "$dir/err")" || bad "unknown --type: $(cat "$dir/err")"
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
