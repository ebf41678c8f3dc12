#!/usr/bin/env bash
# Makes .venv-bench: llama-cpp-python built from source (several minutes on
# 2 cores the first time), for make bench and make test-quants. Rebuilt
# when tests/python/requirements-bench.txt or the build flags change.
#
# Flags: the SIMD extensions this CPU reports, named one by one rather than
# -march=native: native also turns on AMX where the CPU has it, and a VM
# that does not hand the AMX tile state to processes kills llama.cpp with
# SIGILL on its first K-quant matmul.
set -euo pipefail
cd "$(dirname "$0")/.."
req=tests/python/requirements-bench.txt
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
    avx512_vnni:AVX512_VNNI avx512vbmi:AVX512_VBMI avx512_bf16:AVX512_BF16; do
    if [[ " $flags " == *" ${pair%%:*} "* ]]; then
        args+=" -DGGML_${pair#*:}=ON"
    else
        args+=" -DGGML_${pair#*:}=OFF"
    fi
done
stamp=.venv-bench/.requirements.sha256
want=$( (cat "$req"; echo "$args") | sha256sum | cut -d' ' -f1)
if [ ! -x .venv-bench/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bench-venv: building llama-cpp-python into .venv-bench (takes minutes): $args"
    python3 -m venv .venv-bench
    CMAKE_ARGS="$args" .venv-bench/bin/pip install -q --disable-pip-version-check \
        --force-reinstall --no-cache-dir -r "$req"
    echo "$want" > "$stamp"
fi
