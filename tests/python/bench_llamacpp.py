"""llama.cpp's speed on the same model and thread count, through llama-cpp-python.

The yardstick for `tandem bench engine` (issue 2, "Must show" 6). It measures
as llama-bench does:
  - prefill: a 512-token prompt of random token ids (fixed seed) evaluated on
    an empty KV cache in one batch (n_batch = n_ubatch = 512), logits only for
    the last token;
  - decode: 128 single-token evaluations after a 1-token prompt (tg128);
  - batched decode (low-level API): 32 sequences, each one token per step,
    one llama_decode per step, over 128 steps, one KV stream per sequence
    (llama.cpp's default; --kv-unified shares one);
each repeated --reps times after one warm-up run; the mean is the figure
(the median and every run are printed too: on a shared machine one run can
be far off).

    python bench_llamacpp.py [-m MODEL] [--threads N] [--reps 3] [--json]

It also serves the reference check in test_reference.py:

    python bench_llamacpp.py --logits-of TEXT -o FILE [--greedy N]

tokenizes TEXT with llama.cpp (special tokens parsed, no BOS unless the model
asks for one), writes the last position's logits as float32 to FILE and
prints {"ids": [...], "greedy": [...]} as JSON.

It needs llama-cpp-python (tests/python/requirements-bench.txt), which is kept
out of the test venv because it compiles llama.cpp from source.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

try:
    import llama_cpp
except ImportError:
    sys.exit(
        "bench_llamacpp.py needs llama-cpp-python: python3 -m venv .venv-bench && "
        'CMAKE_ARGS="-DGGML_NATIVE=ON" .venv-bench/bin/pip install -r tests/python/requirements-bench.txt'
    )

PREFILL_TOKENS = 512
DECODE_TOKENS = 128
SEED = 1234


def default_model_path():
    home = os.environ.get("TANDEM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "tandem")
    return os.path.join(home, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def open_model(path, threads, n_ctx, flash_attn):
    return llama_cpp.Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=PREFILL_TOKENS,
        n_ubatch=PREFILL_TOKENS,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        flash_attn=flash_attn,
        verbose=False,
    )


def random_tokens(n_vocab, n, rng):
    return [int(t) for t in rng.integers(0, n_vocab, size=n)]


def time_prefill(llm, tokens):
    llm.reset()  # eval() then drops every cached position: an empty KV cache
    t0 = time.perf_counter()
    llm.eval(tokens)
    return time.perf_counter() - t0


def time_decode(llm, first, tokens):
    llm.reset()
    llm.eval([first])
    t0 = time.perf_counter()
    for t in tokens:
        llm.eval([t])
    return time.perf_counter() - t0


class BatchedDecoder:
    """n_seqs sequences decoded together through llama.cpp's low-level API:
    one llama_decode per step carrying one token of every sequence."""

    def __init__(self, llm, n_seqs, n_steps, threads, flash_attn, kv_unified):
        params = llama_cpp.llama_context_default_params()
        # Each sequence's KV stream holds its tokens, rounded up to 256 cells
        # (llama.cpp pads a stream to a multiple of 256 anyway).
        params.n_ctx = n_seqs * 256 * ((n_steps + 1 + 255) // 256)
        params.n_batch = max(PREFILL_TOKENS, n_seqs)
        params.n_ubatch = max(PREFILL_TOKENS, n_seqs)
        params.n_seq_max = n_seqs
        params.kv_unified = kv_unified  # False: one KV stream per sequence
        params.n_threads = threads
        params.n_threads_batch = threads
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed for the batched context")
        self.n_seqs = n_seqs
        self.batch = llama_cpp.llama_batch_init(n_seqs, 0, 1)

    def close(self):
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)

    def _step(self, tokens, pos):
        b = self.batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = i
            b.logits[i] = True
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError("llama_decode returned %d" % rc)

    def run(self, first, steps):
        """first: one token per sequence; steps: list of per-step token lists.
        Returns the seconds the steps took (not the first one)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self._step(first, 0)
        llama_cpp.llama_synchronize(self.ctx)
        t0 = time.perf_counter()
        for pos, tokens in enumerate(steps, start=1):
            self._step(tokens, pos)
        llama_cpp.llama_synchronize(self.ctx)
        return time.perf_counter() - t0


def bench(args):
    llm = open_model(args.model, args.threads, PREFILL_TOKENS + DECODE_TOKENS + 64, args.flash_attn)
    n_vocab = llm.n_vocab()
    rng = np.random.default_rng(SEED)
    prompt = random_tokens(n_vocab, PREFILL_TOKENS, rng)
    first = random_tokens(n_vocab, 1, rng)[0]
    gen = random_tokens(n_vocab, DECODE_TOKENS, rng)

    time_prefill(llm, prompt)  # warm-up
    prefill = [PREFILL_TOKENS / time_prefill(llm, prompt) for _ in range(args.reps)]
    time_decode(llm, first, gen[:8])  # warm-up
    decode = [DECODE_TOKENS / time_decode(llm, first, gen) for _ in range(args.reps)]

    result = {
        "prefill_tok_s": float(np.mean(prefill)),
        "decode_tok_s": float(np.mean(decode)),
        "version": llama_cpp.__version__,
        "threads": args.threads,
        "flash_attn": args.flash_attn,
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
        "prefill_median_tok_s": float(np.median(prefill)),
        "decode_median_tok_s": float(np.median(decode)),
        "prefill_runs": [round(x, 1) for x in prefill],
        "decode_runs": [round(x, 1) for x in decode],
    }

    batched = []
    for n_seqs in args.batched:
        dec = BatchedDecoder(llm, n_seqs, DECODE_TOKENS, args.threads, args.flash_attn, args.kv_unified)
        try:
            firsts = random_tokens(n_vocab, n_seqs, rng)
            steps = [random_tokens(n_vocab, n_seqs, rng) for _ in range(DECODE_TOKENS)]
            dec.run(firsts, steps[:4])  # warm-up
            runs = [n_seqs * DECODE_TOKENS / dec.run(firsts, steps) for _ in range(args.reps)]
        finally:
            dec.close()
        batched.append({"seqs": n_seqs, "tok_s": float(np.mean(runs)), "median_tok_s": float(np.median(runs)),
                        "runs": [round(x, 1) for x in runs]})
    if batched:
        result["batched"] = batched
    return result


def print_table(r):
    print("llama.cpp via llama-cpp-python %s, %d threads, flash attention %s"
          % (r["version"], r["threads"], "on" if r["flash_attn"] else "off"))
    row = "%-28s %12s %12s   %s"
    print(row % ("test", "mean tok/s", "median", "runs"))
    print(row % ("prefill pp%d" % PREFILL_TOKENS, "%.1f" % r["prefill_tok_s"], "%.1f" % r["prefill_median_tok_s"],
                 r["prefill_runs"]))
    print(row % ("decode tg%d (batch 1)" % DECODE_TOKENS, "%.1f" % r["decode_tok_s"], "%.1f" % r["decode_median_tok_s"],
                 r["decode_runs"]))
    for b in r.get("batched", []):
        print(row % ("decode %d seqs x %d steps" % (b["seqs"], DECODE_TOKENS), "%.1f" % b["tok_s"],
                     "%.1f" % b["median_tok_s"], b["runs"]))


def logits_of(args):
    llm = open_model(args.model, args.threads, 4096, args.flash_attn)
    n_vocab = llm.n_vocab()
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm._model.model))
    ids = llm.tokenize(args.logits_of.encode("utf-8"), add_bos=bool(add_bos), special=True)
    llm.reset()
    llm.eval(ids)
    row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).copy()
    row.astype(np.float32).tofile(args.out)
    greedy = []
    for step in range(args.greedy):
        tok = int(np.argmax(row))
        greedy.append(tok)
        if step + 1 < args.greedy:
            llm.eval([tok])
            row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).copy()
    print(json.dumps({"ids": list(ids), "greedy": greedy, "version": llama_cpp.__version__}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=default_model_path())
    ap.add_argument("--threads", type=int, default=available_cores(),
                    help="threads for llama.cpp (default: the cores this process may use)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batched", type=int, nargs="*", default=[32],
                    help="sequence counts for batched decode (none: skip it)")
    ap.add_argument("--flash-attn", choices=["on", "off"], default="on",
                    help="llama.cpp's flash attention (default on: llama.cpp's own default, auto, "
                         "turns it on for the CPU)")
    ap.add_argument("--kv-unified", action="store_true",
                    help="batched decode: one KV buffer shared by all sequences (default: one per sequence)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--logits-of", metavar="TEXT", help="reference-check mode (see the module doc)")
    ap.add_argument("-o", "--out", help="logits file for --logits-of")
    ap.add_argument("--greedy", type=int, default=0, help="greedy tokens for --logits-of")
    args = ap.parse_args()
    args.flash_attn = args.flash_attn == "on"
    if not os.path.isfile(args.model):
        sys.exit("no model at %s (fetch it with `make model`, or pass -m)" % args.model)

    if args.logits_of is not None:
        if not args.out:
            sys.exit("--logits-of needs -o FILE")
        logits_of(args)
        return
    result = bench(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
