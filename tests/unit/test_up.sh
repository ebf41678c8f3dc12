#!/usr/bin/env bash
# tandem up / status / down against fake roles (tests/unit/fake_role.py):
# wrapper scripts named tandem-kvstore, -router, -prefill, -decode in a temp
# dir that TANDEM_BIN_DIR points at. Checks a 1 prefill / 2 decode / 2 store
# cluster end to end, kill -9 seen by status, down (twice, and SIGKILL for a
# process that ignores SIGTERM), refusals (port taken, cluster running, no
# model) and a role that dies at start. Every wait is bounded; everything
# started is stopped by the trap.
set -u
BIN=${TANDEM_BIN_DIR:?set TANDEM_BIN_DIR to the bin dir of the build}
SRC=$(cd "$(dirname "$0")" && pwd)
TANDEM=$BIN/tandem
PY=$(command -v python3) || { echo "skip: no python3"; exit 77; }
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
base=$((20000 + ($$ % 2000) * 16))
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
alive() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    [ "${s:0:1}" != Z ] && [ "${s:0:1}" != X ]
}
cleanup() {
    [ -f "$RUN/cluster.json" ] && timeout 20 "$TANDEM" down --run-dir "$RUN" --timeout 2 >/dev/null 2>&1
    [ -n "$holder_pid" ] && kill "$holder_pid" 2>/dev/null
    local p
    for p in $(fake_pids); do kill -9 "$p" 2>/dev/null; done
    rm -rf "$tmp"
}
trap cleanup EXIT

pass=0 fail=0
check() { # check NAME COMMAND...: ok/FAIL line
    local name=$1
    shift
    if "$@"; then
        echo "ok   $name"
        pass=$((pass + 1))
    else
        echo "FAIL $name"
        fail=$((fail + 1))
    fi
}
up() { timeout 60 "$TANDEM" up -m "$tmp/model.gguf" --port "$PORT" --grpc-port "$GRPC" \
    --port-base "$PB" --kv-capacity 1MiB --timeout 20 "$@"; }
status_json() { timeout 30 "$TANDEM" status --run-dir "$RUN" --json; }
# Fields of status --json, one process per line: name pid alive healthy.
fields() { "$PY" -c '
import json, sys
for p in json.load(sys.stdin):
    print(p["name"], p["pid"], str(p["alive"]).lower(), str(p["healthy"]).lower(), p["role"], p["address"])
'; }
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

# ---- kill -9 one process: status sees it --------------------------------
victim=$(awk '$1 == "decode-1" {print $2}' "$tmp/st.txt")
kill -9 "$victim"
for _ in $(seq 50); do alive "$victim" || break; sleep 0.1; done
status_json >"$tmp/st2.json"
rc=$?
fields <"$tmp/st2.json" >"$tmp/st2.txt"
check "status exits 1 after kill -9 of decode-1 (got $rc)" [ $rc -eq 1 ]
check "decode-1 shows dead and unhealthy" grep -q "^decode-1 $victim false false" "$tmp/st2.txt"
check "the other 5 stay healthy" [ "$(grep -c ' true true ' "$tmp/st2.txt")" -eq 5 ]

# ---- down, twice --------------------------------------------------------
timeout 60 "$TANDEM" down --run-dir "$RUN" >"$tmp/down.out" 2>&1
rc=$?
check "down exits 0 (got $rc)" [ $rc -eq 0 ]
left=0
while read -r name pid _; do alive "$pid" && left=1; done <"$tmp/st.txt"
check "no recorded pid is left" [ $left -eq 0 ]
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
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1)
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
