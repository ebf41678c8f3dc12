"""DESIGN.md "Same answer however served", end to end through the HTTP API:
8 questions at temperature 0 answered by `tandem generate`, by a colocated
cluster (decode nodes only) and by a disaggregated one (1 prefill, 2
decode, 2 stores; every prompt through the prefill node and the store), one
at a time, all at once, and again when the prefix cache hits."""

import concurrent.futures as cf
import os

import pytest

from cluster import Cluster, default_model, sanitized, tandem_generate

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 100.",
    "Who wrote Pride and Prejudice?",
    "Translate 'good morning' into Spanish and German.",
    "What does a CPU cache do?",
    "Give me a name for a small grey cat.",
]
MAX_TOKENS = 40

pytestmark = pytest.mark.skipif(not os.path.exists(default_model()),
                                reason="the default model is not fetched (make model)")


@pytest.fixture(scope="module")
def reference():
    if sanitized():
        pytest.skip("end-to-end answers are checked on the Release build (ASan is too slow)")
    return [tandem_generate(p, MAX_TOKENS) for p in PROMPTS]


def answers(c, concurrent=False):
    if not concurrent:
        return [c.chat(p, MAX_TOKENS)[0] for p in PROMPTS]
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        return list(ex.map(lambda p: c.chat(p, MAX_TOKENS)[0], PROMPTS))


def check(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{what}: prompt {i} differs:\n  got  {g!r}\n  want {w!r}"


def test_colocated(reference):
    with Cluster(prefill=0, decode=1, stores=0) as c:
        check(answers(c), reference, "colocated")
        check(answers(c, concurrent=True), reference, "colocated, concurrent")
        # and streamed: the joined stream equals the non-streamed answer
        text, _ = c.chat_stream(PROMPTS[0], MAX_TOKENS)
        assert text == reference[0]


def test_disaggregated(reference, report):
    with Cluster(prefill=1, decode=2, stores=2, router_args=["--disagg-min-tokens", "0"]) as c:
        check(answers(c), reference, "disaggregated")
        m = c.metrics("prefill")
        assert m.get("tandem_node_kv_put_blocks_total", 0) > 0, "no block went to the store"
        imported = sum(c.metrics("decode", i).get("tandem_node_kv_imported_tokens_total", 0)
                       for i in range(2))
        assert imported > 0, "no decode node imported KV from the store"
        check(answers(c, concurrent=True), reference, "disaggregated, concurrent")
        # the third round finds every prompt's full blocks in the store
        hits0 = c.metrics("prefill").get("tandem_node_kv_store_hit_tokens_total", 0)
        check(answers(c), reference, "disaggregated, prefix cache hit")
        hits1 = c.metrics("prefill").get("tandem_node_kv_store_hit_tokens_total", 0)
        assert hits1 > hits0, "the store held none of the prompts' blocks the second time"
        report(f"disaggregated: {int(imported)} prompt tokens imported by decode nodes; "
               f"{int(hits1 - hits0)} prompt tokens found in the store on the repeat round")
