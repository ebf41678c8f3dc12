#!/usr/bin/env bash
# The demo: one chat answer from the engine, streamed to the terminal.
# (The cluster, `tandem up`, comes with the router; until then the demo runs
# the engine directly.)
set -euo pipefail
cd "$(dirname "$0")/.."
Q="What is the capital of France?"
echo
echo "\$ build/bin/tandem generate --chat \"$Q\" --temp 0"
build/bin/tandem generate --chat "$Q" --temp 0 -n 128
echo
echo "Try your own: build/bin/tandem generate --chat \"...\"   (tandem generate --help for flags)"
