#!/usr/bin/env bash
# Every broken GGUF of test_gguf, given to `tandem generate -m`, must be
# refused with one clear error on stderr and exit status 2, no crash (the
# ASan build runs this too).
set -u
BIN=${TANDEM_BIN_DIR:?}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
TANDEM_TEST_GGUF_BAD_DIR=$dir "$BIN/test_gguf" >/dev/null 2>&1
n=0 bad=0
for f in "$dir"/*.gguf; do
    [ -e "$f" ] || continue
    n=$((n + 1))
    err=$(timeout 60 "$BIN/tandem" generate -m "$f" -p hello -n 1 2>&1 >/dev/null)
    rc=$?
    if [ $rc -ne 2 ] || ! grep -q "byte" <<<"$err"; then
        echo "FAIL $(basename "$f"): exit $rc, stderr: $err"
        bad=$((bad + 1))
    else
        echo "ok   $(basename "$f"): $(head -c 200 <<<"$err")"
    fi
done
# The tokenizer-only commands take the same path.
f=$(ls "$dir"/*.gguf | head -n 1)
echo hi | timeout 60 "$BIN/tandem" tokenize -m "$f" >/dev/null 2>&1
[ $? -eq 2 ] || { echo "FAIL tokenize on a bad file did not exit 2"; bad=$((bad + 1)); }
echo "$((n - bad)) passed, $bad failed ($n broken files)"
[ $n -ge 12 ] && [ $bad -eq 0 ]
