#!/usr/bin/env python3
"""The table a bench stage of tests/gpu/run.sh prints last: the items'
outcomes, then the engine on the Llama-3-8B-shaped synthetic models against
the ceilings measured in the same call (HBM copy bandwidth, cuBLAS GEMM).
Reads $OUT/status.txt (STAGE ITEM RESULT DETAIL lines), ceilings.json and
engine-{f16,q4_1}.json; writes summary.json beside them. Information only:
run.sh's exit status says what passed."""
import json
import os
import sys

# Llama-3-8B shapes (tandem mkmodel --preset llama3-8b): weights a decode
# step reads per token, and the matmul FLOPs of a prompt token.
LAYERS, D, KV, FF, VOCAB = 32, 4096, 1024, 14336, 128256
LAYER_PARAMS = LAYERS * (2 * D * D + 2 * KV * D + 3 * FF * D)
OUTPUT_PARAMS = VOCAB * D
BYTES_PER_PARAM = {"f16": 2.0, "q4_1": 20.0 / 32.0}


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(out):
    rows = []
    try:
        status = [ln.split(None, 3) for ln in open(os.path.join(out, "status.txt")) if ln.strip()]
    except OSError:
        status = []
    print("\n== tandem on the GPU ==")
    for f in status:
        stage, item, result = f[0], f[1], f[2]
        print(f"  {stage:<9} {item:<22} {result}")
    ceil = load(os.path.join(out, "ceilings.json"))
    summary = {"status": {f"{f[0]}/{f[1]}": f[2] for f in status}, "ceilings": ceil, "engine": {}}
    if ceil:
        print(f"  device {ceil['device']}: copy {ceil['copy_gbps']:.0f} GB/s (read+write), "
              f"cuBLAS f16 GEMM {ceil['gemm_layer_tflops']:.0f} TFLOP/s on an 8B layer "
              f"at {ceil['tokens']} tokens")
    hdr = (f"\n  {'weights':<6} {'batch':>5} {'tok/s':>9} {'GB/s':>7} {'of HBM':>7}   "
           f"{'prefill TFLOP/s':>15} {'of cuBLAS':>9}")
    printed = False
    for t in ("f16", "q4_1"):
        e = load(os.path.join(out, f"engine-{t}.json"))
        if not e:
            continue
        if not printed:
            print(hdr)
            printed = True
        bpt = (LAYER_PARAMS + OUTPUT_PARAMS) * BYTES_PER_PARAM[t]
        pre_tflops = e["prefill_tok_s"] * 2 * LAYER_PARAMS / 1e12
        pre_frac = pre_tflops / ceil["gemm_layer_tflops"] if ceil else float("nan")
        b1 = e["decode_tok_s"]
        gbs = b1 * bpt / 1e9
        frac = gbs / ceil["copy_gbps"] if ceil else float("nan")
        print(f"  {t:<6} {1:>5} {b1:>9.1f} {gbs:>7.0f} {frac:>7.0%}   {pre_tflops:>15.1f} "
              f"{pre_frac:>9.0%}")
        res = {"decode_b1_tok_s": b1, "decode_b1_gbps": gbs, "decode_b1_hbm_frac": frac,
               "prefill_tok_s": e["prefill_tok_s"], "prefill_tflops": pre_tflops,
               "prefill_cublas_frac": pre_frac, "batched": []}
        for b in e.get("batched", []):
            # a step reads the weights once for all sequences
            gbs_b = b["tok_s"] / b["seqs"] * bpt / 1e9
            frac_b = gbs_b / ceil["copy_gbps"] if ceil else float("nan")
            print(f"  {t:<6} {b['seqs']:>5} {b['tok_s']:>9.1f} {gbs_b:>7.0f} {frac_b:>7.0%}")
            res["batched"].append({**b, "weight_gbps": gbs_b, "hbm_frac": frac_b})
        summary["engine"][t] = res
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("\n  targets: batch-1 decode >= 80% of HBM copy bandwidth; prefill >= 60% of cuBLAS")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "/tmp/tandem-gpu"))
