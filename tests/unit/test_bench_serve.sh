#!/usr/bin/env bash
# `tandem bench serve` against tests/python/fake_openai_server.py (streams
# a token every 20 ms, HTTP chunks and SSE events cut at odd places):
# closed loop at concurrency 1 and 4, an open loop, the JSON's figures
# against what the fake sent, the SVG as XML, --compare, the failure kinds
# (HTTP 500, an error in the stream, a cut stream, a stall past --timeout,
# no [DONE]) and bad flags. About 10 s.
set -u
BIN=${TANDEM_BIN_DIR:?}/tandem
SRC=${TANDEM_SOURCE_DIR:?}
PY=python3
[ -x "$BIN" ] || { echo "skip: $BIN is not built"; exit 77; }
command -v $PY >/dev/null || { echo "skip: no python3"; exit 77; }
# flags also read TANDEM_<FLAG>: none from the caller's environment
unset TANDEM_URL TANDEM_MODEL TANDEM_API_KEY TANDEM_API TANDEM_PROMPTS TANDEM_MAX_TOKENS \
    TANDEM_TEMPERATURE TANDEM_CONCURRENCY TANDEM_RATE TANDEM_REQUESTS TANDEM_DURATION \
    TANDEM_TIMEOUT TANDEM_SEED TANDEM_LABEL TANDEM_JSON TANDEM_JSON_FILE TANDEM_SVG TANDEM_COMPARE

dir=$(mktemp -d)
srv=
cleanup() {
    [ -n "$srv" ] && kill "$srv" 2>/dev/null && wait "$srv" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT

DELAY=0.02
$PY "$SRC/tests/python/fake_openai_server.py" --port-file "$dir/port" --delay $DELAY --split \
    2>"$dir/server.log" &
srv=$!
for _ in $(seq 100); do
    [ -s "$dir/port" ] && break
    sleep 0.1
done
[ -s "$dir/port" ] || { echo "FAIL the fake server did not start: $(cat "$dir/server.log")"; exit 1; }
URL=http://127.0.0.1:$(cat "$dir/port")
fails=0
check() { # check NAME COMMAND...: runs the command, prints ok/FAIL
    local name=$1
    shift
    if "$@" >"$dir/check.out" 2>&1; then
        echo "ok   $name $(tail -n 1 "$dir/check.out")"
    else
        echo "FAIL $name: $(cat "$dir/check.out")"
        fails=$((fails + 1))
    fi
}
stats() { $PY -c "import json,urllib.request as u; print(json.load(u.urlopen('$URL/stats', timeout=5))['tokens_sent'])"; }

# closed loop
t0=$(stats)
timeout 60 "$BIN" bench serve --url "$URL" -c 1,4 -n 8 --max-tokens 12 --seed 7 \
    --label colocated --json-file "$dir/a.json" --svg "$dir/a.svg" >"$dir/a.txt" 2>"$dir/a.err"
rc=$?
t1=$(stats)
check "closed loop exits 0" test $rc -eq 0
check "closed loop table" grep -q "ITL p50/p99" "$dir/a.txt"
check "closed loop progress on stderr" grep -q "concurrency 4: 8/8 done" "$dir/a.err"
check "closed loop JSON" $PY - "$dir/a.json" $((t1 - t0)) $DELAY <<'EOF'
import json, sys
j = json.load(open(sys.argv[1])); sent = int(sys.argv[2]); delay_ms = float(sys.argv[3]) * 1000
assert j["label"] == "colocated" and j["mode"] == "closed", j
lv = j["levels"]
assert [l["concurrency"] for l in lv] == [1, 4], lv
total = 0
for l in lv:
    assert l["requests"] == 8 and l["ok"] == 8 and l["failed"] == 0, l
    assert l["output_tokens"] == 8 * 12 and l["content_chunks"] == 8 * 12, l
    assert l["prompt_tokens"] > 8 * 600, l  # the shared ~600-word system prompt
    itl, ttft, e2e = l["itl_ms"], l["ttft_ms"], l["e2e_ms"]
    assert 0.75 * delay_ms <= itl["p50"] <= 2.0 * delay_ms, itl
    assert itl["p50"] <= itl["p99"] < 10 * delay_ms, itl
    assert 0.75 * delay_ms <= ttft["p50"] <= ttft["p99"] < 20 * delay_ms, ttft
    assert e2e["p50"] >= 11 * delay_ms * 0.9, e2e
    assert l["output_tok_s"] > 0 and l["requests_s"] > 0, l
    total += l["output_tokens"]
assert total == sent, (total, sent)
assert lv[1]["output_tok_s"] > 2 * lv[0]["output_tok_s"], lv
print("ITL p50 %.1f ms (fake: %.0f), %d tokens = sent" % (lv[0]["itl_ms"]["p50"], delay_ms, sent))
EOF
check "SVG is XML" $PY -c "
import sys, xml.etree.ElementTree as E
r = E.parse(sys.argv[1]).getroot()
assert r.tag.endswith('svg'), r.tag
n = sum(1 for e in r.iter() if e.tag.endswith('polyline'))
assert n == 2, n
print('svg ok')" "$dir/a.svg"

# open loop, completions API, mixed prompts, JSON on stdout
t0=$(stats)
timeout 60 "$BIN" bench serve --url "$URL" --rate 40 -n 12 --max-tokens 6 --api completions \
    --prompts mix --label disaggregated --json --json-file "$dir/b.json" >"$dir/b.out" 2>"$dir/b.err"
rc=$?
t1=$(stats)
check "open loop exits 0" test $rc -eq 0
check "open loop JSON" $PY - "$dir/b.out" $((t1 - t0)) <<'EOF'
import json, sys
j = json.load(open(sys.argv[1])); sent = int(sys.argv[2])
assert j["mode"] == "open" and j["api"] == "completions" and j["prompts"] == "mix", j
(l,) = j["levels"]
assert l["rate"] == 40 and l["ok"] + l["dropped"] == 12 and l["failed"] == 0, l
assert l["output_tokens"] == 6 * l["ok"] == sent, (l, sent)
print("%d requests, %d tokens" % (l["ok"], sent))
EOF
check "compare plots two runs" "$BIN" bench serve --compare "$dir/a.json,$dir/b.json" \
    --svg "$dir/cmp.svg"
check "compare SVG is XML" $PY -c "
import sys, xml.etree.ElementTree as E
r = E.parse(sys.argv[1]).getroot()
n = sum(1 for e in r.iter() if e.tag.endswith('polyline'))
assert n == 4, n
print('svg ok')" "$dir/cmp.svg"

# failures: each counted under its kind, exit status 1, bounded by --timeout
fault() { # fault MODEL KIND
    local t0=$SECONDS
    timeout 30 "$BIN" bench serve --url "$URL" --model "$1" -c 2 -n 2 --max-tokens 4 --timeout 1 \
        --json >"$dir/f.json" 2>"$dir/f.err"
    local rc=$?
    check "fault $1 is a $2 error" $PY -c "
import json, sys
j = json.load(open(sys.argv[1])); l = j['levels'][0]
assert sys.argv[3] == '1', 'exit status ' + sys.argv[3]
assert l['failed'] == 2 and l['ok'] == 0 and l['errors'][sys.argv[2]] == 2, l
assert int(sys.argv[4]) <= 5, 'took %s s' % sys.argv[4]
print([x for x in open(sys.argv[5]) if 'the first:' in x][0].split('the first: ')[1][:120].strip())" "$dir/f.json" "$2" $rc \
        $((SECONDS - t0)) "$dir/f.err"
}
fault fault-500 http
fault fault-stream-error api
fault fault-close stream
fault fault-stall timeout
fault fault-nodone stream
timeout 30 "$BIN" bench serve --url http://127.0.0.1:1 -c 1 -n 1 --json >"$dir/f.json" 2>/dev/null
check "refused connection is a connect error" $PY -c "
import json, sys
l = json.load(open(sys.argv[1]))['levels'][0]
assert l['errors']['connect'] == 1, l
print('ok')" "$dir/f.json"

# bad flags: exit status 2
for args in "--prompts bogus" "--url ftp://x" "-c 0" "-c 1,x" "--api foo" "--max-tokens 0"; do
    # shellcheck disable=SC2086
    "$BIN" bench serve $args >/dev/null 2>&1
    check "bad flags ($args) exit 2" test $? -eq 2
done

[ $fails -eq 0 ] && echo "all passed" || echo "$fails failed"
[ $fails -eq 0 ]
