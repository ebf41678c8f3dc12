#!/usr/bin/env bash
# Installs what tandem needs to build and test, when it is missing:
# Debian packages (apt-get) and a Python venv (.venv) for the test clients
# and references. Fast when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(build-essential cmake pkg-config clang libclang-rt-dev libpcre2-dev libxxhash-dev
      libucx-dev ucx-utils libprotobuf-c-dev protobuf-c-compiler liblz4-dev libmicrohttpd-dev
      libjansson-dev libgrpc-dev libssl-dev iproute2 procps
      python3 python3-venv python3-pip curl ca-certificates)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: installing Debian packages: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
        SUDO=sudo
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python venv for tests: reinstalled only when requirements.txt changes.
req=tests/python/requirements.txt
stamp=.venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "deps: preparing the Python venv in .venv"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r "$req"
    echo "$want" > "$stamp"
fi
