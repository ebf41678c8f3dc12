#!/usr/bin/env python3
"""Colocated against disaggregated serving on equal cores (issue 4, must
show 6), with `tandem bench serve` as the load:

  disaggregated  1 prefill node pinned to core 0, 1 decode node pinned to
                 core 1 (taskset), 1 store; every prompt goes through the
                 prefill node and the store
  colocated      1 decode node on both cores (2 threads), no prefill node:
                 prompts and decoding share the cores

Both get the same load: --prompts mix (1,000-word documents and short
chats), a closed-loop concurrency sweep. Writes JSON per run, a comparison
SVG, and prints both tables.

  scripts/bench-serve-cluster.py [--bin build/bin] [--out docs/data] [-c 1,4,8] [-n 24]
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "python"))
os.environ.pop("TANDEM_MODEL", None)  # bench serve would read it as --model

from cluster import Cluster  # noqa: E402


def bench(bin_dir, c, label, args, out):
    json_path = os.path.join(out, f"serve-{label}.json")
    argv = [os.path.join(bin_dir, "tandem"), "bench", "serve", "--url",
            f"http://127.0.0.1:{c.http_port}", "--prompts", "mix", "-c", args.concurrency,
            "-n", str(args.requests), "--max-tokens", str(args.max_tokens), "--label", label,
            "--json-file", json_path, "--timeout", "300"]
    print(f"== {label}: {' '.join(argv[1:])}", flush=True)
    subprocess.run(argv, check=True)
    return json_path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(REPO, "build", "bin"))
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "data"))
    ap.add_argument("-c", "--concurrency", default="1,4,8")
    ap.add_argument("-n", "--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    os.environ["TANDEM_BIN"] = os.path.join(os.path.abspath(args.bin), "tandem")
    os.makedirs(args.out, exist_ok=True)
    runs = []
    # disaggregated: one core each
    c = Cluster(prefill=0, decode=0, stores=1, threads=1,
                router_args=["--disagg-min-tokens", "0"])
    with c:
        c.add_node("prefill", wrap=["taskset", "-c", "0"])
        c.add_node("decode", wrap=["taskset", "-c", "1"])
        runs.append(bench(args.bin, c, "disaggregated", args, args.out))
    # colocated: both roles on both cores
    c = Cluster(prefill=0, decode=0, stores=0, threads=2)
    with c:
        c.add_node("decode", wrap=["taskset", "-c", "0,1"])
        runs.append(bench(args.bin, c, "colocated", args, args.out))
    svg = os.path.join(args.out, "serve-colocated-vs-disaggregated.svg")
    subprocess.run([os.path.join(args.bin, "tandem"), "bench", "serve", "--compare",
                    ",".join(runs), "--svg", svg], check=True)
    print(f"wrote {', '.join(runs)} and {svg}")


if __name__ == "__main__":
    main()
