"""Quantizes a GGUF with llama.cpp itself (llama_model_quantize through
llama-cpp-python), to give tandem real files made by llama.cpp:

    python llamacpp_quantize.py IN.gguf OUT.gguf TYPE [--threads N]

TYPE is a llama.cpp file type name as its quantize tool spells it (Q4_K_M,
Q5_K_M, Q6_K, Q8_0, IQ4_XS, BF16, Q2_K, Q3_K_M, ...). Runs in the venv that
has llama-cpp-python (tests/python/requirements-bench.txt).
"""

import argparse
import ctypes
import os
import sys

try:
    import llama_cpp
except ImportError:
    sys.exit("llamacpp_quantize.py needs llama-cpp-python (see tests/python/requirements-bench.txt)")


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inp")
    ap.add_argument("out")
    ap.add_argument("type")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    name = "LLAMA_FTYPE_MOSTLY_" + a.type.upper()
    if a.type.upper() == "F32":
        name = "LLAMA_FTYPE_ALL_F32"
    if not hasattr(llama_cpp, name):
        sys.exit("unknown llama.cpp file type %s" % a.type)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, name)
    params.nthread = a.threads
    params.allow_requantize = True
    tmp = a.out + ".tmp"
    rc = llama_cpp.llama_model_quantize(a.inp.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit("llama_model_quantize(%s -> %s, %s) failed with %d" % (a.inp, a.out, a.type, rc))
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main(sys.argv[1:])
