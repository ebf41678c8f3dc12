#!/usr/bin/env bash
# tandem up / status / down against fake roles (tests/unit/fake_role.py):
# wrapper scripts named tandem-kvstore, -router, -prefill, -decode in a temp
# dir that TANDEM_BIN_DIR points at. Checks a 1 prefill / 2 decode / 2 store
# cluster end to end; the supervisor: kill -9 of a store, a decode node and
# the router restarted on the same ports with their logs appended, backoff,
# restart counts in status, an exit 0 not restarted, a role that keeps
# failing given up, the supervisor killed (down still stops all, including
# a process a role left behind); down (twice, and SIGKILL for a process
# that ignores SIGTERM), refusals (port taken, cluster running, no model)
# and a role that dies at start. Every wait is bounded; everything started
# is stopped by the trap. tests/unit/test_up_restart.sh does the restarts
# with the real roles.
set -u
BIN=${TANDEM_BIN_DIR:?set TANDEM_BIN_DIR to the bin dir of the build}
SRC=$(cd "$(dirname "$0")" && pwd)
TANDEM=$BIN/tandem
PY=$(command -v python3) || { echo "skip: no python3"; exit 77; }
. "$(dirname "$0")/lib/check.sh"
[ -x "$TANDEM" ] || { echo "FAIL: no $TANDEM"; exit 1; }

tmp=$(mktemp -d)
fake=$tmp/bin
mkdir -p "$fake" "$tmp/home"
# A copy per run, so this run's fakes are told apart from any other's.
cp "$SRC/fake_role.py" "$tmp/fake_role.py"
for role in kvstore router prefill decode; do
    printf '#!/bin/sh\nFAKE_ROLE=%s exec "%s" "%s" "$@"\n' "$role" "$PY" "$tmp/fake_role.py" \
        >"$fake/tandem-$role"
    chmod +x "$fake/tandem-$role"
done
: >"$tmp/model.gguf"
# 16 ports free now, below the ephemeral range (32768 up) where other
# tests' client connections land.
base=$(free_port_block "$PY") || { echo "FAIL: no 16 free ports found"; exit 1; }
PORT=$base GRPC=$((base + 1)) PB=$((base + 2))
RUN=$tmp/run
holder_pid=

export TANDEM_BIN_DIR=$fake TANDEM_HOME=$tmp/home
unset TANDEM_CLUSTER_TOKEN TANDEM_API_KEY TANDEM_KVSTORE TANDEM_PORT TANDEM_TIMEOUT

# Our fakes still running (zombies do not count): their pids.
fake_pids() {
    local p
    for p in /proc/[0-9]*; do
        grep -qF "$tmp/fake_role.py" "$p/cmdline" 2>/dev/null || continue
        alive "${p#/proc/}" && echo "${p#/proc/}"
    done
}
dead() { ! alive "$1"; }
cleanup() {
    [ -f "$RUN/cluster.json" ] && timeout 20 "$TANDEM" down --run-dir "$RUN" --timeout 2 >/dev/null 2>&1
    [ -n "$holder_pid" ] && kill "$holder_pid" 2>/dev/null
    local p
    for p in $(fake_pids); do kill -9 "$p" 2>/dev/null; done
    rm -rf "$tmp"
}
trap cleanup EXIT

up() { timeout 60 "$TANDEM" up -m "$tmp/model.gguf" --port "$PORT" --grpc-port "$GRPC" \
    --port-base "$PB" --kv-capacity 1MiB --timeout 20 "$@"; }
status_json() { timeout 30 "$TANDEM" status --run-dir "$RUN" --json; }
# Fields of status --json, one process per line: name pid alive healthy
# role address restarts state.
fields() { "$PY" -c '
import json, sys
for p in json.load(sys.stdin):
    print(p["name"], p["pid"], str(p["alive"]).lower(), str(p["healthy"]).lower(), p["role"],
          p["address"], p["restarts"], p["state"])
'; }
# One key of NAME's entry in status --json (booleans as true/false).
pfield() { status_json 2>/dev/null | "$PY" -c '
import json, sys
for p in json.load(sys.stdin):
    if p["name"] == sys.argv[1]:
        v = p[sys.argv[2]]
        print(str(v).lower() if isinstance(v, bool) else v)' "$1" "$2"; }
# A key of cluster.json.
cfield() { "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
    "$RUN/cluster.json" "$1"; }
# wait_until SECONDS COMMAND...: polls COMMAND until it succeeds; false at the deadline.
wait_until() {
    local end=$((SECONDS + $1))
    shift
    until "$@"; do
        [ $SECONDS -ge "$end" ] && return 1
        sleep 0.2
    done
}
# back NAME OLD_PID RESTARTS: NAME alive and healthy under a new pid, restarted RESTARTS times.
back() { status_json 2>/dev/null | fields |
    awk -v n="$1" -v o="$2" -v r="$3" '$1 == n && $2 != o && $3 == "true" && $4 == "true" && $7 == r {f = 1}
        END {exit !f}'; }
state_is() { [ "$(pfield "$1" state)" = "$2" ]; }
http_code() { "$PY" -c '
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode() if len(sys.argv) > 2 else None,
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read().decode()
        print(r.status, body.replace("\n", " "))
except urllib.error.HTTPError as e:
    print(e.code)
except Exception as e:
    print(0, e)' "$@"; }
no_fakes_left() { [ -z "$(fake_pids)" ]; }

# ---- a 1/2/2 cluster --------------------------------------------------
up --run-dir "$RUN" --prefill 1 --decode 2 --kvstore 2 >"$tmp/up.out" 2>"$tmp/up.err"
rc=$?
check "up 1 prefill, 2 decode, 2 kvstore exits 0 (got $rc)" [ $rc -eq 0 ]
[ $rc -eq 0 ] || { cat "$tmp/up.err"; }
check "up prints the OpenAI base URL" grep -qF "http://127.0.0.1:$PORT/v1" "$tmp/up.out"
check "up prints the gRPC address" grep -qF "127.0.0.1:$GRPC" "$tmp/up.out"
check "up says how to stop" grep -qF "tandem down --run-dir $RUN" "$tmp/up.out"
check "up showed progress" grep -q "waiting for decode-1 (loading model)" "$tmp/up.err"
check "token file is 0600" [ "$(stat -c %a "$RUN/token")" = 600 ]
check "token is 64 hex digits" grep -qE '^[0-9a-f]{64}$' "$RUN/token"
status_json >"$tmp/st.json"
rc=$?
fields <"$tmp/st.json" >"$tmp/st.txt"
check "status --json exits 0 when all healthy (got $rc)" [ $rc -eq 0 ]
check "status lists 6 processes" [ "$(wc -l <"$tmp/st.txt")" -eq 6 ]
check "every process healthy and alive" [ "$(grep -c ' true true ' "$tmp/st.txt")" -eq 6 ]
all_alive=1
while read -r name pid _; do alive "$pid" || all_alive=0; done <"$tmp/st.txt"
check "every recorded pid is alive" [ $all_alive -eq 1 ]
check "roles: 2 kvstore, 1 router, 1 prefill, 2 decode" [ "$(awk '{print $5}' "$tmp/st.txt" |
    sort | uniq -c | awk '{printf "%s%s ", $1, $2}')" = "2decode 2kvstore 1prefill 1router " ]
token=$(cat "$RUN/token")
leak=0
while read -r name pid _; do grep -qF "$token" "/proc/$pid/cmdline" && leak=1; done <"$tmp/st.txt"
check "the token is on no command line" [ $leak -eq 0 ]
check "nodes got both stores" grep -qF -- "--kvstore 127.0.0.1:$((PB + 1)),127.0.0.1:$((PB + 3))" \
    "$RUN/decode-1.log"
check "nodes got the router's listener" grep -qF -- "--router 127.0.0.1:$PB" "$RUN/prefill-0.log"
timeout 30 "$TANDEM" status --run-dir "$RUN" >"$tmp/st.table"
check "status table names decode-1" grep -q "^decode .*decode-1" "$tmp/st.table"

# ---- a second up on the same run dir is refused ------------------------
up --run-dir "$RUN" >"$tmp/up2.out" 2>&1
rc=$?
check "up refuses while the cluster runs (exit $rc)" [ $rc -eq 1 ]
check "the refusal says tandem down" grep -q "tandem down" "$tmp/up2.out"
check "the cluster is untouched" [ "$(status_json | fields | grep -c ' true true ')" -eq 6 ]

# ---- the supervisor: kill -9 of a store, a decode node and the router ----
sup=$(cfield supervisor_pid)
check "a supervisor is recorded and alive (pid $sup)" alive "$sup"
check "the supervisor has no token on its command line" bash -c "! grep -qF '$token' /proc/$sup/cmdline"
check "status names the supervisor" grep -q "^supervisor pid $sup: restarts a role that dies" "$tmp/st.table"
declare -A old addr
for n in kvstore-0 decode-1 router-0; do
    old[$n]=$(awk -v n=$n '$1 == n {print $2}' "$tmp/st.txt")
    addr[$n]=$(awk -v n=$n '$1 == n {print $6}' "$tmp/st.txt")
    kill -9 "${old[$n]}"
done
for n in kvstore-0 decode-1 router-0; do
    check "$n is back within 20 s, healthy, under a new pid" wait_until 20 back $n "${old[$n]}" 1
    check "$n's old pid ${old[$n]} is gone" dead "${old[$n]}"
    check "$n keeps its address ${addr[$n]}" [ "$(pfield $n address)" = "${addr[$n]}" ]
    check "$n: status says 1 restart, last exit signal 9" \
        [ "$(pfield $n restarts) $(pfield $n last_exit)" = "1 signal 9 (Killed)" ]
    check "$n: its log has the restart marker" \
        grep -q "^==== tandem up: restart 1 of $n at .*pid ${old[$n]}, ended: signal 9 (Killed)" "$RUN/$n.log"
    check "$n: its log was appended to (both starts in it)" \
        [ "$(grep -c "^$n: serving on " "$RUN/$n.log")" -eq 2 ]
    check "$n: the supervisor log says which, how and when next" grep -q \
        "tandem up: $n (role ${n%-*}, index ${n##*-}, pid ${old[$n]}) ended after .*: signal 9 (Killed); restart 1 in 1 s" \
        "$RUN/supervisor.log"
done
for n in decode-1 kvstore-0; do
    url=$(pfield $n health_url)
    code=$(http_code "$url" | cut -d' ' -f1)
    check "$n serves on its port again (GET $url: $code)" [ "$code" = 200 ]
done
check "kvstore-0 holds its listener again" grep -qF -- "--listen ${addr[kvstore-0]}" "$RUN/kvstore-0.log"
http_code "http://127.0.0.1:$PORT/v1/chat/completions" \
    '{"messages": [{"role": "user", "content": "Capital of France?"}], "stream": true}' >"$tmp/chat.out"
check "the restarted router answers a chat request" grep -q "^200 .*Paris" "$tmp/chat.out"
status_json >/dev/null
rc=$?
check "status exits 0 once all are back (got $rc)" [ $rc -eq 0 ]
timeout 30 "$TANDEM" status --run-dir "$RUN" >"$tmp/st.table2"
check "the status table shows decode-1's restart" \
    grep -qE "^decode +decode-1 .* 1 +signal 9 \(Killed\)$" "$tmp/st.table2"
check "status --json: state running, supervised" \
    [ "$(pfield decode-1 state) $(pfield decode-1 supervised)" = "running true" ]

# Backoff: the second failure in a row waits 2 s.
pid1=$(pfield decode-1 pid)
kill -9 "$pid1"
check "a second kill -9 of decode-1 is restarted after 2 s" wait_until 10 grep -q \
    "decode-1 (role decode, index 1, pid $pid1) ended after .*; restart 2 in 2 s" "$RUN/supervisor.log"
check "decode-1 is back again (restarts 2)" wait_until 20 back decode-1 "$pid1" 2

# An exit with status 0 (a drain, SIGTERM) is a wanted stop: not restarted.
pid0=$(pfield decode-0 pid)
kill -TERM "$pid0"
check "decode-0 exits 0 on SIGTERM: state stopped" wait_until 10 state_is decode-0 stopped
sleep 2
check "decode-0 is not restarted (still dead after 2 s, 0 restarts)" \
    [ "$(pfield decode-0 alive) $(pfield decode-0 restarts)" = "false 0" ]
check "the supervisor log says why" grep -q "decode-0 .* exited with status 0 .*not restarted" \
    "$RUN/supervisor.log"
status_json >/dev/null
rc=$?
check "status exits 1 with decode-0 stopped (got $rc)" [ $rc -eq 1 ]
status_json | fields >"$tmp/st3.txt"
cat "$tmp/st.txt" >>"$tmp/st3.txt"

# ---- down, twice --------------------------------------------------------
timeout 60 "$TANDEM" down --run-dir "$RUN" >"$tmp/down.out" 2>&1
rc=$?
check "down exits 0 (got $rc)" [ $rc -eq 0 ]
left=0
while read -r name pid _; do alive "$pid" && left=1; done <"$tmp/st3.txt"
check "no recorded pid (first or restarted) is left" [ $left -eq 0 ]
check "down stopped the supervisor first" grep -q "^supervisor (pid $sup): told to restart nothing more" \
    "$tmp/down.out"
check "the supervisor is gone" dead "$sup"
check "it exited after its roles" grep -q "all roles have exited; the supervisor exits" \
    "$RUN/supervisor.log"
check "no fake of this run is left" no_fakes_left
check "down stopped nodes before the router, router before stores" "$PY" -c '
import sys
lines = [l.split()[1] for l in open(sys.argv[1]) if l.startswith("stopping ")]
rank = lambda n: 0 if n.startswith(("prefill", "decode")) else 1 if n.startswith("router") else 2
r = [rank(n) for n in lines]
sys.exit(0 if len(r) == 5 and r == sorted(r) else 1)' "$tmp/down.out"
check "cluster.json removed" [ ! -e "$RUN/cluster.json" ]
check "logs kept" [ -s "$RUN/decode-0.log" ]
timeout 30 "$TANDEM" down --run-dir "$RUN" >/dev/null 2>&1
check "a second down exits 0" [ $? -eq 0 ]
timeout 30 "$TANDEM" status --run-dir "$RUN" >/dev/null 2>&1
check "status with no cluster exits 2" [ $? -eq 2 ]

# ---- a port taken -------------------------------------------------------
"$PY" -c '
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1)
print("held", flush=True); time.sleep(120)' $((PB + 1)) >"$tmp/holder.out" &
holder_pid=$!
for _ in $(seq 100); do grep -q held "$tmp/holder.out" 2>/dev/null && break; sleep 0.05; done
up --run-dir "$RUN" >"$tmp/up3.out" 2>&1
rc=$?
check "up refuses when a port is taken (exit $rc)" [ $rc -ne 0 ]
check "it names the port and its use" grep -q "port $((PB + 1)) (kvstore-0 listener) is taken" \
    "$tmp/up3.out"
check "nothing was started" no_fakes_left
check "nothing was recorded" [ ! -e "$RUN/cluster.json" ]
kill "$holder_pid" 2>/dev/null
wait "$holder_pid" 2>/dev/null
holder_pid=

# ---- a role that dies at start ------------------------------------------
FAKE_DIE=decode-1 up --run-dir "$RUN" --decode 2 >"$tmp/up4.out" 2>&1
rc=$?
check "up exits 1 when decode-1 dies at start (got $rc)" [ $rc -eq 1 ]
check "it says which and how" grep -q "decode-1 exited with status 3" "$tmp/up4.out"
check "it shows the log's tail" grep -q "failing at start as FAKE_DIE asks" "$tmp/up4.out"
check "nothing is left running" no_fakes_left
check "nothing is left recorded" [ ! -e "$RUN/cluster.json" ]

# ---- colocated, and a process that ignores SIGTERM ----------------------
FAKE_IGNORE_TERM=decode-0 up --run-dir "$RUN" --prefill 0 --kvstore 0 >"$tmp/up5.out" 2>&1
rc=$?
check "colocated up (--prefill 0 --kvstore 0) exits 0 (got $rc)" [ $rc -eq 0 ]
check "colocated: router and one decode" [ "$(status_json | fields | awk '{print $1}' | xargs)" = \
    "router-0 decode-0" ]
check "colocated decode gets no --kvstore" bash -c "! grep -qF -- --kvstore '$RUN/decode-0.log'"
timeout 60 "$TANDEM" down --run-dir "$RUN" --timeout 1 >"$tmp/down2.out" 2>&1
rc=$?
check "down exits 0 with a SIGTERM-deaf node (got $rc)" [ $rc -eq 0 ]
check "it used SIGKILL" grep -q "decode-0 .* did not exit within 1 s; sending SIGKILL" "$tmp/down2.out"
check "nothing left after SIGKILL" no_fakes_left

# ---- no model -----------------------------------------------------------
timeout 30 "$TANDEM" up --run-dir "$RUN" --port-base "$PB" >"$tmp/up6.out" 2>&1
rc=$?
check "up without a model exits 2 (got $rc)" [ $rc -eq 2 ]
check "it says make model" grep -q "make model" "$tmp/up6.out"

# ---- a role that keeps failing is given up, not spun ----------------------
mkdir -p "$tmp/die"
FAKE_DIE_DIR=$tmp/die up --run-dir "$RUN" --prefill 0 --kvstore 0 >"$tmp/up7.out" 2>&1
rc=$?
check "a colocated cluster is up (got $rc)" [ $rc -eq 0 ]
[ $rc -eq 0 ] || cat "$tmp/up7.out"
victim=$(pfield decode-0 pid)
touch "$tmp/die/decode-0" # from now on every start of decode-0 fails at once
t0=$SECONDS
kill -9 "$victim"
# 5 quick failures in a row: the kill, then 4 restarts after 1, 2, 4, 8 s.
check "decode-0 is given up within 60 s" wait_until 60 state_is decode-0 failed
took=$((SECONDS - t0))
check "it took the backoff's time, not a spin (${took} s >= 14 s)" [ $took -ge 14 ]
check "4 restarts were tried" [ "$(pfield decode-0 restarts)" = 4 ]
check "its log has 4 restart markers and 4 failed starts" [ "$(grep -c '^==== tandem up: restart ' \
    "$RUN/decode-0.log") $(grep -c 'failing at start as FAKE_DIE_DIR asks' "$RUN/decode-0.log")" = "4 4" ]
check "the last exit is the failed start's" [ "$(pfield decode-0 last_exit)" = "exit status 3" ]
check "status --json gives the reason" bash -c "[[ '$(pfield decode-0 error)' == 'gave up after 5 failures in a row'*'see $RUN/decode-0.log'* ]]"
timeout 30 "$TANDEM" status --run-dir "$RUN" >"$tmp/st.table3"
rc=$?
check "status exits 1 (got $rc)" [ $rc -eq 1 ]
check "the status table says FAILED" grep -qE "^decode +decode-0 .* 4 +exit status 3 \(FAILED, not restarted\)$" \
    "$tmp/st.table3"
check "and why, on its own line" grep -q "^decode-0: gave up after 5 failures in a row" "$tmp/st.table3"
check "the supervisor log says it gave up" grep -q "decode-0 (role decode, index 0): gave up after 5" \
    "$RUN/supervisor.log"
delays=$(grep "decode-0 (role decode, index 0, pid [0-9]*) ended after" "$RUN/supervisor.log" |
    sed -n 's/.*; restart [0-9]* in \([0-9]*\) s$/\1/p' | xargs)
check "the backoff doubled: 1, 2, 4, 8 s (got $delays)" [ "$delays" = "1 2 4 8" ]
sleep 2
check "no attempt after giving up" [ "$(pfield decode-0 restarts)" = 4 ]
check "the router is untouched" [ "$(pfield router-0 healthy) $(pfield router-0 restarts)" = "true 0" ]
timeout 60 "$TANDEM" down --run-dir "$RUN" >"$tmp/down3.out" 2>&1
rc=$?
check "down exits 0 (got $rc)" [ $rc -eq 0 ]
check "nothing is left" no_fakes_left
rm -f "$tmp/die/decode-0"

# ---- the supervisor killed: nothing restarts, down still stops everything --
FAKE_CHILD=decode-0 up --run-dir "$RUN" --prefill 0 --kvstore 0 >"$tmp/up8.out" 2>&1
rc=$?
check "a colocated cluster is up (got $rc)" [ $rc -eq 0 ]
sup=$(cfield supervisor_pid)
child=$(sed -n 's/^decode-0: child pid \([0-9]*\)$/\1/p' "$RUN/decode-0.log")
check "decode-0 started a child (pid $child)" alive "${child:-0}"
kill -9 "$sup"
check "the supervisor is dead" wait_until 10 dead "$sup"
victim=$(pfield router-0 pid)
kill -9 "$victim"
sleep 2.5
check "a role killed now stays dead (no restart)" \
    [ "$(pfield router-0 alive) $(pfield router-0 restarts)" = "false 0" ]
check "status --json: supervised false" [ "$(pfield decode-0 supervised)" = false ]
timeout 30 "$TANDEM" status --run-dir "$RUN" >"$tmp/st.table4"
check "the status table says the supervisor is not running" grep -q "^supervisor NOT running" \
    "$tmp/st.table4"
up --run-dir "$RUN" --prefill 0 --kvstore 0 >"$tmp/up9.out" 2>&1
rc=$?
check "up still refuses while decode-0 runs (exit $rc)" [ $rc -eq 1 ]
check "it says tandem down" grep -q "stop it first: tandem down --run-dir $RUN" "$tmp/up9.out"
timeout 60 "$TANDEM" down --run-dir "$RUN" --timeout 5 >"$tmp/down4.out" 2>&1
rc=$?
check "down exits 0 (got $rc)" [ $rc -eq 0 ]
check "decode-0's child, left in the cluster's session, was killed" dead "${child:-0}"
check "down said so" grep -q "pid $child was left in the cluster's session; sending SIGKILL" "$tmp/down4.out"
check "nothing is left" no_fakes_left
check "cluster.json removed" [ ! -e "$RUN/cluster.json" ]

check "no sanitizer report from tandem (supervisor.log, the outputs)" bash -c \
    "! grep -lE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' '$RUN/supervisor.log' '$tmp'/*.out"

# ---- scripts/demo.sh against the fakes (the fake router streams a canned answer)
if command -v curl >/dev/null; then
    mkdir -p "$tmp/home/models"
    : >"$tmp/home/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    BUILD=$(dirname "$BIN") TANDEM_PORT=$PORT TANDEM_GRPC_PORT=$GRPC TANDEM_PORT_BASE=$PB \
        DEMO_STOP=1 timeout 120 bash "$SRC/../../scripts/demo.sh" >"$tmp/demo.out" 2>&1
    rc=$?
    check "demo.sh exits 0 (got $rc)" [ $rc -eq 0 ]
    check "demo prints the streamed answer" grep -qx "The capital of France is Paris." "$tmp/demo.out"
    check "demo shows the OpenAI SDK line" grep -qF "OpenAI(base_url=\"http://127.0.0.1:$PORT/v1\"" \
        "$tmp/demo.out"
    check "DEMO_STOP=1 stopped the demo cluster" no_fakes_left
    [ $rc -eq 0 ] || cat "$tmp/demo.out"
else
    echo "skip demo.sh checks: no curl"
fi

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
