#!/usr/bin/env bash
# The demo (`make demo`, after set-up, build and model): a local tandem
# cluster (kvstore, router, one prefill and one decode node) with
# `tandem up`, then one chat answer streamed through its OpenAI API with
# curl. The cluster stays up for you to try; DEMO_STOP=1 stops it at the end.
#   BUILD        build dir of the binaries (default: build)
#   TANDEM_HOME  where models and the demo's run dir live (~/.cache/tandem)
#   TANDEM_PORT  the OpenAI port (default 8000); TANDEM_API_KEY if you set one
set -euo pipefail
cd "$(dirname "$0")/.."
TANDEM=${BUILD:-build}/bin/tandem
HOME_DIR=${TANDEM_HOME:-$HOME/.cache/tandem}
RUN=$HOME_DIR/demo
PORT=${TANDEM_PORT:-8000}
GRPC=${TANDEM_GRPC_PORT:-8001}
BASE=http://127.0.0.1:$PORT/v1
Q="What is the capital of France?"
auth=()
[ -n "${TANDEM_API_KEY:-}" ] && auth=(-H "Authorization: Bearer $TANDEM_API_KEY")

[ -x "$TANDEM" ] || { echo "demo: $TANDEM is missing; run make first" >&2; exit 1; }

# A demo cluster left running from last time is reused when healthy.
st=0
"$TANDEM" status --run-dir "$RUN" >/dev/null 2>&1 || st=$?
if [ "$st" -eq 0 ]; then
    echo "A demo cluster is already running in $RUN; using it."
else
    [ "$st" -eq 1 ] && "$TANDEM" down --run-dir "$RUN" >/dev/null 2>&1
    echo "\$ $TANDEM up --run-dir $RUN"
    "$TANDEM" up --run-dir "$RUN"
fi

# The model's name as the router serves it.
model=$(curl -sf "${auth[@]}" "$BASE/models" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])' 2>/dev/null) ||
    model=tandem
body=$(python3 -c 'import json, sys
print(json.dumps({"model": sys.argv[1], "stream": True, "temperature": 0, "max_tokens": 128,
                  "messages": [{"role": "user", "content": sys.argv[2]}]}))' "$model" "$Q")

echo
echo "\$ curl -N $BASE/chat/completions -H 'Content-Type: application/json' \\"
echo "    -d '$body'"
echo
# The SSE stream, answer text only, printed as it arrives.
curl -sS -N --fail-with-body --max-time 300 "${auth[@]}" "$BASE/chat/completions" \
    -H 'Content-Type: application/json' -d "$body" |
    python3 -u -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("data:"):
        if line.startswith("{"):  # an error body instead of a stream
            print(line, file=sys.stderr)
            sys.exit(1)
        continue
    data = line[5:].strip()
    if data == "[DONE]":
        break
    for choice in json.loads(data).get("choices", []):
        print(choice.get("delta", {}).get("content") or "", end="", flush=True)
print()
' || {
    echo "demo: the request failed; the cluster says:" >&2
    "$TANDEM" status --run-dir "$RUN" >&2 || true
    echo "  logs: $RUN/*.log" >&2
    exit 1
}

echo
echo "The cluster is an OpenAI-compatible server; point the OpenAI SDK at it:"
echo "  from openai import OpenAI"
if [ -n "${TANDEM_API_KEY:-}" ]; then
    echo "  client = OpenAI(base_url=\"$BASE\", api_key=os.environ[\"TANDEM_API_KEY\"])"
else
    echo "  client = OpenAI(base_url=\"$BASE\", api_key=\"none\")"
fi
echo "  client.chat.completions.create(model=\"$model\", messages=[{\"role\": \"user\", \"content\": \"Hi\"}])"
echo "gRPC: 127.0.0.1:$GRPC.  Processes and health: $TANDEM status --run-dir $RUN"
if [ "${DEMO_STOP:-0}" = 1 ]; then
    "$TANDEM" down --run-dir "$RUN"
else
    echo "The cluster keeps running; stop it with: $TANDEM down --run-dir $RUN"
fi
