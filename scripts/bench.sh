#!/usr/bin/env bash
# make bench: tandem's engine benchmark and llama.cpp's (through the PyPI
# package llama-cpp-python) on the same model file with the same thread
# count, back to back, then the ratios. Results go to build/bench/ as JSON.
# The first run builds llama-cpp-python from source into .venv-bench (several
# minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
THREADS=${THREADS:-$(nproc)}
out=$BUILD/bench
mkdir -p "$out"
scripts/bench-venv.sh
echo "bench: tandem bench engine --threads $THREADS"
"$BUILD/bin/tandem" bench engine --threads "$THREADS" --json | tee "$out/tandem.json"
echo "bench: llama.cpp (llama-cpp-python) --threads $THREADS"
.venv-bench/bin/python tests/python/bench_llamacpp.py --threads "$THREADS" --json | tee "$out/llamacpp.json"
.venv/bin/python - "$out/tandem.json" "$out/llamacpp.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1])); l = json.load(open(sys.argv[2]))
b1 = t["decode_tok_s"]
print()
print(f"{'':24s}{'tandem':>10s}{'llama.cpp':>12s}{'ratio':>8s}  target")
print(f"{'prefill 512 (tok/s)':24s}{t['prefill_tok_s']:10.1f}{l['prefill_tok_s']:12.1f}{t['prefill_tok_s']/l['prefill_tok_s']:8.2f}  >= 0.8")
print(f"{'decode batch 1 (tok/s)':24s}{b1:10.1f}{l['decode_tok_s']:12.1f}{b1/l['decode_tok_s']:8.2f}  >= 1.0")
lb = {b["seqs"]: b["tok_s"] for b in l.get("batched", [])}
for b in t["batched"]:
    ref = lb.get(b["seqs"])
    refs = f"{ref:12.1f}" if ref else f"{'-':>12s}"
    print(f"{'decode ' + str(b['seqs']) + ' seqs (tok/s)':24s}{b['tok_s']:10.1f}{refs}"
          f"{b['tok_s']/b1:8.2f}x of tandem batch 1" + ("  (target >= 6 at 32)" if b["seqs"] == 32 else ""))
PY

# The KV store over loopback beside ucx_perftest, and the KV codecs on real
# SmolLM2 KV (issue 3).
echo
echo "bench: tandem bench kvstore"
"$BUILD/bin/tandem" bench kvstore --json | tee "$out/kvstore.json"
echo "bench: tandem bench codec"
"$BUILD/bin/tandem" bench codec --json | tee "$out/codec.json"
.venv/bin/python - "$out/kvstore.json" "$out/codec.json" <<'PY'
import json, sys
k = json.load(open(sys.argv[1])); c = json.load(open(sys.argv[2]))
print()
print(f"{'kvstore, ' + str(k['block_bytes']) + ' B blocks':28s}{'GB/s':>8s}{'p50 us':>10s}{'p99 us':>10s}")
for name, g, p50, p99 in [("PUT, 1 in flight", k["put1_gbps"], k["put1_p50_us"], k["put1_p99_us"]),
                          ("PUT, 16 in flight", k["put_gbps"], k["put_p50_us"], k["put_p99_us"]),
                          ("GET, 1 in flight", k["get1_gbps"], k["get1_p50_us"], k["get1_p99_us"]),
                          ("GET, 16 in flight", k["get_gbps"], k["get_p50_us"], k["get_p99_us"])]:
    print(f"{name:28s}{g:8.2f}{p50:10.0f}{p99:10.0f}")
pt = k["perftest_am_gbps"]
print(f"{'GET, 16 in flight, hot':28s}{k['get_hot_gbps']:8.2f}")
print(f"{'ucx_perftest ucp_am_bw':28s}{pt:8.2f}   GET 16 / perftest = {k['get_vs_perftest']:.2f}, hot {k['get_hot_vs_perftest']:.2f} (target >= 0.8)")
print(json.dumps(c, indent=1)[:2000])
PY

# The GGUF quantizations people download (issue 15): tandem and llama.cpp on
# the same files llama.cpp wrote, same threads, back to back. Needs the
# files of make test-quants; skipped (and said so) without them.
echo
qdir=${TANDEM_HOME:-$HOME/.cache/tandem}/quants
for f in smollm2-Q4_K_M smollm2-Q6_K synth256-Q4_K_M synth256-Q6_K; do
    m=$qdir/$f.gguf
    if [ ! -f "$m" ]; then
        echo "bench: no $m (make test-quants writes it): skipped"
        continue
    fi
    echo "bench: $f: tandem, then llama.cpp, --threads $THREADS"
    "$BUILD/bin/tandem" bench engine -m "$m" --threads "$THREADS" --batches 1 --json > "$out/tandem-$f.json"
    .venv-bench/bin/python tests/python/bench_llamacpp.py -m "$m" --threads "$THREADS" --batched --json > "$out/llamacpp-$f.json"
    .venv/bin/python - "$f" "$out/tandem-$f.json" "$out/llamacpp-$f.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[2])); l = json.load(open(sys.argv[3]))
for what, key in [("prefill 512", "prefill_tok_s"), ("decode batch 1", "decode_tok_s")]:
    print(f"{sys.argv[1]:18s} {what:16s} tandem {t[key]:9.1f}  llama.cpp {l[key]:9.1f}  ratio {t[key]/l[key]:5.2f}  (target >= 1.5)")
PY
done
