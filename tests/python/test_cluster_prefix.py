"""Prefix cache across nodes: with a ~600-token shared system prompt, the
second request's prefill computes only its new blocks (the others come
from the KV store, put there by the first request, possibly from another
prefill node), and its time to first token drops. The prefill nodes run
without their local prefix cache, so every hit here crossed the network."""

import http.client
import json
import os
import time

import pytest

from cluster import Cluster, default_model, sanitized

pytestmark = pytest.mark.skipif(not os.path.exists(default_model()) or sanitized(),
                                reason="needs the default model and the Release build")

WORDS = ("policy customer invoice refund shipping warranty account order delivery "
         "payment support escalation holiday weekend courier receipt damaged return "
         "exchange discount loyalty member premium standard express tracking").split()


def system_prompt(n_words=420):
    # deterministic, about 600 tokens with SmolLM2's tokenizer
    out = ["You are the support assistant of a small shop. Follow these rules."]
    for i in range(n_words):
        out.append(WORDS[(i * 7 + i // 5) % len(WORDS)])
        if i % 12 == 11:
            out.append(f"(rule {i // 12}).")
    return " ".join(out)


def first_token_time(c, messages):
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", c.http_port, timeout=120)
    t0 = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    first, usage = None, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        js = json.loads(line[6:])
        if first is None and js.get("choices") and js["choices"][0]["delta"].get("content"):
            first = time.monotonic() - t0
        if js.get("usage"):
            usage = js["usage"]
    conn.close()
    return first, usage


def test_prefix_cache_across_prefill_nodes(report):
    sys_p = system_prompt()
    with Cluster(prefill=2, decode=1, stores=1, threads=1,
                 router_args=["--disagg-min-tokens", "0"],
                 node_args=["--no-enable-prefix-caching"]) as c:
        def prefill_sum(name):
            return sum(c.metrics("prefill", i).get(name, 0) for i in range(2))

        # warm both prefill nodes (first-touch costs) with an unrelated prompt
        c.chat("Say hi.", max_tokens=2)
        c.chat("Say hello.", max_tokens=2)
        h0 = prefill_sum("tandem_node_kv_store_hit_tokens_total")
        t_cold, u1 = first_token_time(c, [{"role": "system", "content": sys_p},
                                          {"role": "user", "content": "How do refunds work?"}])
        h1 = prefill_sum("tandem_node_kv_store_hit_tokens_total")
        t_warm, u2 = first_token_time(c, [{"role": "system", "content": sys_p},
                                          {"role": "user", "content": "Can I change my order?"}])
        h2 = prefill_sum("tandem_node_kv_store_hit_tokens_total")
        n1, n2 = u1["prompt_tokens"], u2["prompt_tokens"]
        assert n1 >= 600 and n2 >= 600, (n1, n2)
        assert h1 - h0 == 0, "the first request found blocks it could not have"
        hit = h2 - h1
        # every full block of the shared system prompt came from the store
        assert hit >= 16 * ((n2 - 40) // 16) - 16, f"only {hit} of {n2} prompt tokens hit"
        assert u2.get("prompt_tokens_details", {}).get("cached_tokens", hit) >= hit - 16
        report(f"prefix cache across nodes: prompt {n1} then {n2} tokens; second request: "
               f"{int(hit)} tokens from the store, {n2 - int(hit)} computed; "
               f"TTFT {t_cold * 1000:.0f} ms cold -> {t_warm * 1000:.0f} ms warm "
               f"({t_cold / t_warm:.1f}x)")
        assert t_warm < t_cold, (t_cold, t_warm)
