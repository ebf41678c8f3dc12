#!/usr/bin/env bash
# tests/gpu/prebuild.sh: builds here, on the CPU machine, what
# tests/gpu/run.sh runs on a GPU machine, into .gpu-prebuilt/ (about 30 MB;
# carry it to the device call), so the lent machine spends its minutes
# testing, not compiling:
#   bin/  tandem, test_cuda_ops, test_cuda_sample, test_cuda_model and
#         bench_cuda for sm_$TANDEM_GPU_ARCH (90: H100 and H200), the CUDA
#         runtime linked statically
#   lib/  the Debian libraries they need that the GPU machine's image lacks
#         (PCRE2, xxHash, LZ4), from .gpu-deps
# The configure sees only .gpu-deps' libraries (PKG_CONFIG_LIBDIR), as the
# GPU machine would: so it also checks that tests/gpu/prepare-deps.sh
# fetches every library CMake requires, and the binaries leave out the
# network roles, whose libraries that machine does not have. bench_cuda
# takes cuBLAS from the machine's CUDA toolkit. Every binary is checked to
# start here with only those libraries.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
ARCH=${TANDEM_GPU_ARCH:-90}
BUILD=build-gpu-prebuilt
OUTD=.gpu-prebuilt
BINS="tandem test_cuda_ops test_cuda_sample test_cuda_model bench_cuda"
command -v nvcc > /dev/null || {
    echo "prebuild: nvcc is not on PATH: the CUDA toolkit is needed to build the GPU binaries" >&2
    exit 1
}
[ -d .gpu-deps ] || tests/gpu/prepare-deps.sh
libdir=$ROOT/.gpu-deps/usr/lib/x86_64-linux-gnu
grep -qx "/$OUTD/" .git/info/exclude 2> /dev/null || echo "/$OUTD/" >> .git/info/exclude

echo "prebuild: configure $BUILD (sm_$ARCH) with only .gpu-deps' libraries visible"
rm -rf "$BUILD"
if ! env -u PKG_CONFIG_PATH PKG_CONFIG_LIBDIR="$libdir/pkgconfig" \
    cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DTANDEM_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCH" > "/tmp/tandem-prebuild-configure.log" 2>&1; then
    tail -20 /tmp/tandem-prebuild-configure.log
    echo "prebuild: configure failed with .gpu-deps alone: a library CMake requires is missing" \
        "from tests/gpu/prepare-deps.sh's list" >&2
    exit 1
fi
grep -q "building without the network roles" /tmp/tandem-prebuild-configure.log ||
    echo "prebuild: note: the network roles were found (not expected with .gpu-deps alone)"
echo "prebuild: build $BINS ($(nproc) jobs; a few minutes)"
cmake --build "$BUILD" -j "$(nproc)" --target $BINS > /tmp/tandem-prebuild-build.log 2>&1 || {
    grep -E "error|Error" /tmp/tandem-prebuild-build.log | head -30
    exit 1
}

rm -rf "$OUTD"
mkdir -p "$OUTD/bin" "$OUTD/lib"
for b in $BINS; do
    cp "$BUILD/bin/$b" "$OUTD/bin/"
    strip --strip-unneeded "$OUTD/bin/$b" # the device code stays (.nv_fatbin)
done
# the libraries from .gpu-deps the binaries need, under their sonames
for b in $BINS; do
    ldd "$OUTD/bin/$b" | awk '/=>/ {print $1}'
done | sort -u | while read -r so; do
    [ -e "$libdir/$so" ] && cp -L "$libdir/$so" "$OUTD/lib/"
    true
done
# start check: with only the system's C/C++ runtime and lib/, every
# binary resolves all its libraries (cuBLAS excepted: the toolkit's there)
allowed='(^|/)(linux-vdso|libc\.|libm\.|libstdc\+\+|libgcc_s|ld-linux|libpthread|libdl\.|librt\.|libcublas)'
for b in $BINS; do
    extra=$(LD_LIBRARY_PATH=$OUTD/lib ldd "$OUTD/bin/$b" | awk '{print $1, $3}' |
        grep -Ev "$allowed" | grep -v "$OUTD/lib" || true)
    if [ -n "$extra" ]; then
        echo "prebuild: $b needs libraries a GPU machine lacks:" >&2
        echo "$extra" >&2
        exit 1
    fi
done
echo "prebuild: $OUTD ready ($(du -sh "$OUTD" | cut -f1)): $(ls "$OUTD/bin" | tr '\n' ' ')+ $(ls "$OUTD/lib" | tr '\n' ' ')"
