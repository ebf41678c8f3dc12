#!/usr/bin/env bash
# Prepares .gpu-deps/: the few Debian libraries tandem's core needs (PCRE2,
# xxHash, LZ4: every pkg_check_modules(... REQUIRED) of the top-level
# CMakeLists.txt) and pkg-config, unpacked from Debian's packages, for a GPU machine
# that has nvcc, cmake and python but none of our Debian libraries. Run it
# here (it uses apt-get download, no root needed), then carry .gpu-deps to
# the GPU machine; tests/gpu/run.sh finds it. About 1 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.gpu-deps
grep -qx '/.gpu-deps/' .git/info/exclude 2>/dev/null || echo '/.gpu-deps/' >> .git/info/exclude
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
