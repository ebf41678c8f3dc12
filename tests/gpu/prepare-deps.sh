#!/usr/bin/env bash
# tests/gpu/prepare-deps.sh [DIR]: prepares DIR (default .gpu-deps/, an
# absolute path otherwise): the few Debian libraries tandem's core needs
# (PCRE2, xxHash, LZ4: every pkg_check_modules(... REQUIRED) of the
# top-level CMakeLists.txt) and pkg-config, unpacked from Debian's packages,
# for a GPU machine that has nvcc, cmake and python but none of our Debian
# libraries. Run it here (apt-get download, no root needed);
# tests/gpu/prebuild.sh builds against it and carries the libraries along,
# and tests/gpu/run.sh's build stage uses it when .gpu-deps is carried.
# About 1 MB. tests/unit/test_gpu_nodevice.sh checks that a configure with
# only these libraries visible succeeds.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-.gpu-deps}
if [ "$out" = .gpu-deps ]; then
    grep -qx '/.gpu-deps/' .git/info/exclude 2>/dev/null || echo '/.gpu-deps/' >> .git/info/exclude
fi
rm -rf "$out" && mkdir -p "$out/debs"
(cd "$out/debs" && apt-get download -q libpcre2-dev libpcre2-8-0 libxxhash-dev libxxhash0 \
    liblz4-dev liblz4-1 pkgconf pkgconf-bin libpkgconf3 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
for d in "$out"/debs/*.deb; do dpkg-deb -x "$d" "$out"; done
rm -rf "$out/debs"
# .pc files point at /usr: make them relative to where they lie
for pc in "$out"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc; do
    sed -i 's|^prefix=/usr$|prefix=${pcfiledir}/../../..|' "$pc"
done
echo "prepared $out ($(du -sh "$out" | cut -f1)): $(ls "$out"/usr/lib/x86_64-linux-gnu/pkgconfig)"
