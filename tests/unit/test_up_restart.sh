#!/usr/bin/env bash
# tandem up's supervisor with the real roles: a 1 prefill / 1 decode /
# 1 store cluster on loopback answers a greedy chat request; kill -9 of the
# store and of the decode node; both come back on their ports (GET /health
# 200), the router is ready again and the same request gets the same answer;
# `tandem status` counts one restart each with the signal; `tandem down`
# leaves no process behind (recorded, restarted, supervisor, or anything in
# the supervisor's session). Skips (77) without the roles or the model.
# Every wait is bounded; the trap stops everything started.
set -u
BIN=${TANDEM_BIN_DIR:?set TANDEM_BIN_DIR to the bin dir of the build}
TANDEM=$BIN/tandem
PY=$(command -v python3) || { echo "skip: no python3"; exit 77; }
. "$(dirname "$0")/lib/check.sh"
[ -x "$TANDEM" ] || { echo "FAIL: no $TANDEM"; exit 1; }
for role in router prefill decode kvstore; do
    [ -x "$BIN/tandem-$role" ] || { echo "skip: no $BIN/tandem-$role (built without UCX?)"; exit 77; }
done
MODEL=${TANDEM_HOME:-$HOME/.cache/tandem}/models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$MODEL" ] || { echo "skip: no model at $MODEL (make model)"; exit 77; }
# Sanitized builds load and run several times slower.
if [ -n "${TANDEM_TEST_SANITIZED:-}" ]; then START=300 BACK=240; else START=120 BACK=90; fi

tmp=$(mktemp -d)
RUN=$tmp/run
unset TANDEM_CLUSTER_TOKEN TANDEM_API_KEY TANDEM_KVSTORE TANDEM_PORT TANDEM_TIMEOUT

cleanup() {
    [ -f "$RUN/cluster.json" ] && timeout 60 "$TANDEM" down --run-dir "$RUN" --timeout 5 >/dev/null 2>&1
    rm -rf "$tmp"
}
trap cleanup EXIT

dead() { ! alive "$1"; }
wait_until() { # wait_until SECONDS COMMAND...
    local end=$((SECONDS + $1))
    shift
    until "$@"; do
        [ $SECONDS -ge "$end" ] && return 1
        sleep 0.5
    done
}
status_json() { timeout 30 "$TANDEM" status --run-dir "$RUN" --json 2>/dev/null; }
pfield() { # pfield NAME KEY: one key of NAME's entry in status --json
    status_json | "$PY" -c '
import json, sys
for p in json.load(sys.stdin):
    if p["name"] == sys.argv[1]:
        v = p[sys.argv[2]]
        print(str(v).lower() if isinstance(v, bool) else v)' "$1" "$2"
}
back() { # back NAME OLD_PID: alive and healthy under a new pid, restarted once
    status_json | "$PY" -c '
import json, sys
ok = [p for p in json.load(sys.stdin) if p["name"] == sys.argv[1] and p["pid"] != int(sys.argv[2])
      and p["alive"] and p["healthy"] and p["restarts"] == 1]
sys.exit(0 if ok else 1)' "$1" "$2"
}
http_code() { # http_code URL: the status of a GET
    "$PY" -c '
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print(0)' "$1"
}
ready() { [ "$(http_code "http://127.0.0.1:$PORT/ready")" = 200 ]; }
chat() { # chat: the greedy answer's text, or "HTTP CODE"
    "$PY" -c '
import json, sys, urllib.request, urllib.error
body = {"messages": [{"role": "user", "content": "Name three colors of the rainbow."}],
        "max_tokens": 24, "temperature": 0}
req = urllib.request.Request(sys.argv[1], data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=120) as r:
        print(json.load(r)["choices"][0]["message"]["content"])
except urllib.error.HTTPError as e:
    print("HTTP", e.code)
except Exception as e:
    print("HTTP 0", e)' "http://127.0.0.1:$PORT/v1/chat/completions"
}

# 16 ports free now, below the ephemeral range.
base=$(free_port_block "$PY") || { echo "FAIL: no 16 free ports found"; exit 1; }
PORT=$base PB=$((base + 2))

t0=$SECONDS
timeout $((START + 60)) "$TANDEM" up --run-dir "$RUN" -m "$MODEL" --prefill 1 --decode 1 --kvstore 1 \
    --threads 1 --port "$PORT" --grpc-port -1 --port-base "$PB" --kv-capacity 64MiB \
    --timeout "$START" >"$tmp/up.out" 2>&1
rc=$?
check "up 1 prefill, 1 decode, 1 kvstore exits 0 in $((SECONDS - t0)) s (got $rc)" [ $rc -eq 0 ]
[ $rc -eq 0 ] || { cat "$tmp/up.out"; echo "$pass passed, $((fail + 1)) failed"; exit 1; }
sup=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["supervisor_pid"])' "$RUN/cluster.json")
check "the supervisor runs (pid $sup)" alive "$sup"
status_json >"$tmp/st1.json"
first=$(chat)
check "a chat request answers before the kills (\"$first\")" bash -c "[ -n \"\$1\" ] && [ \"\${1#HTTP }\" = \"\$1\" ]" _ "$first"

declare -A old addr health
for n in kvstore-0 decode-0; do
    old[$n]=$(pfield $n pid)
    addr[$n]=$(pfield $n address)
    health[$n]=$(pfield $n health_url)
done
kill -9 "${old[kvstore-0]}" "${old[decode-0]}"
t0=$SECONDS
for n in kvstore-0 decode-0; do
    check "$n is back, alive and healthy under a new pid" wait_until "$BACK" back $n "${old[$n]}"
done
echo "     (back after $((SECONDS - t0)) s)"
for n in kvstore-0 decode-0; do
    check "$n's old pid ${old[$n]} is gone" dead "${old[$n]}"
    check "$n keeps its address ${addr[$n]}" [ "$(pfield $n address)" = "${addr[$n]}" ]
    code=$(http_code "${health[$n]}")
    check "$n answers on its port again (GET ${health[$n]}: $code)" [ "$code" = 200 ]
    check "$n: status says restarts 1, last exit signal 9" \
        [ "$(pfield $n restarts)|$(pfield $n last_exit)|$(pfield $n state)" = "1|signal 9 (Killed)|running" ]
    check "$n: its log has the restart marker" \
        grep -q "^==== tandem up: restart 1 of $n at .*pid ${old[$n]}, ended: signal 9 (Killed)" "$RUN/$n.log"
    check "$n: the supervisor log names it, the signal and the next attempt" grep -q \
        "tandem up: $n (role ${n%-*}, index 0, pid ${old[$n]}) ended after .*: signal 9 (Killed); restart 1 in 1 s" \
        "$RUN/supervisor.log"
done
check "the others were not restarted" \
    [ "$(pfield router-0 restarts) $(pfield prefill-0 restarts)" = "0 0" ]
check "the router is ready again (decode-0 registered)" wait_until "$BACK" ready
second=$(chat)
check "the same request answers the same after the restarts (\"$second\")" [ "$second" = "$first" ]
timeout 30 "$TANDEM" status --run-dir "$RUN" >"$tmp/st.table"
rc=$?
check "status exits 0: all healthy (got $rc)" [ $rc -eq 0 ]
check "the status table shows the restarts" [ "$(grep -cE '^(kvstore|decode) .* 1 +signal 9 \(Killed\)$' \
    "$tmp/st.table")" -eq 2 ]
[ "$fail" -eq 0 ] || cat "$tmp/st.table"

# Every pid seen, first and restarted.
pids="$sup ${old[*]} $(status_json | "$PY" -c 'import json, sys; print(" ".join(str(p["pid"]) for p in json.load(sys.stdin)))')"
timeout 120 "$TANDEM" down --run-dir "$RUN" >"$tmp/down.out" 2>&1
rc=$?
check "down exits 0 (got $rc)" [ $rc -eq 0 ]
left=
for p in $pids; do alive "$p" && left="$left $p"; done
check "no process is left (of:$pids)${left:+; left:$left}" [ -z "$left" ]
in_session=
for s in /proc/[0-9]*/stat; do
    f=$(cat "$s" 2>/dev/null) || continue
    f=${f##*) }
    read -r st _ _ sid _ <<<"$f"
    [ "$sid" = "$sup" ] && [ "$st" != Z ] && in_session="$in_session ${s//[^0-9]/}"
done
check "nothing is left in the supervisor's session${in_session:+:$in_session}" [ -z "$in_session" ]
check "cluster.json removed" [ ! -e "$RUN/cluster.json" ]
check "no sanitizer report in any log" bash -c "! grep -lE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' '$RUN'/*.log"

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
