"""Operations (issue 5, first part): a decode node drains on SIGTERM under
load with no failed request, and a router with an empty pool holds
requests until a node registers (scale from zero), or answers 503 after
--queue-timeout."""

import concurrent.futures as cf
import os
import signal
import threading
import time

import pytest

from cluster import Cluster, default_model, sanitized

pytestmark = pytest.mark.skipif(not os.path.exists(default_model()) or sanitized(),
                                reason="needs the default model and the Release build")


def test_drain_decode_under_load(report):
    with Cluster(prefill=0, decode=2, stores=0, node_args=["--drain-timeout", "60"]) as c:
        n = 30
        mid = threading.Event()
        seen = [0]
        lock = threading.Lock()

        def on_chunk(k):
            if k == 4:
                with lock:
                    seen[0] += 1
                    if seen[0] == 10:
                        mid.set()

        def one(i):
            return c.chat_stream(f"Count from {i} to {i + 20}.", max_tokens=48, timeout=300,
                                 on_chunk=on_chunk)[0]

        with cf.ThreadPoolExecutor(n) as ex:
            futs = [ex.submit(one, i) for i in range(n)]
            assert mid.wait(120)
            victim = c.get("decode", 0)
            jobs_at_signal = c.metrics("decode", 0).get("tandem_node_jobs_total", 0)
            t0 = time.monotonic()
            victim.signal(signal.SIGTERM)
            rc = victim.wait(90)
            took = time.monotonic() - t0
            results = [f.result() for f in futs]
        assert rc == 0, f"the drained node exited with {rc}"
        assert all(isinstance(r, str) and r for r in results)
        log = open(victim.log_path, errors="replace").read()
        assert "SIGTERM: draining" in log
        refused = log.count("refused: draining")
        report(f"drain: SIGTERM to a decode node under {n} streams: {n} of {n} complete, exit 0 "
               f"after {took:.2f} s; it had taken {int(jobs_at_signal)} jobs, refused "
               f"{refused} sent after the signal")


def test_scale_from_zero_and_queue_timeout(report):
    with Cluster(prefill=0, decode=0, stores=0, router_args=["--queue-timeout", "60"]) as c:
        with cf.ThreadPoolExecutor(4) as ex:
            t0 = time.monotonic()
            futs = [ex.submit(c.chat, f"Say {w}.", 8) for w in ("one", "two", "three", "four")]
            time.sleep(1.0)
            assert not any(f.done() for f in futs), "a request finished with no node"
            m = c.metrics("router")
            assert m.get('tandem_router_pending_requests{pool="default"}') == 4, m
            c.add_node("decode")
            texts = [f.result(timeout=120)[0] for f in futs]
            time.sleep(0.1)
            m = c.metrics("router")
            assert m.get('tandem_router_pending_requests{pool="default"}') == 0, m
            took = time.monotonic() - t0
        assert all(texts)
        report(f"scale from zero: 4 held requests completed {took:.1f} s after arrival, "
               f"once a decode node registered")
    with Cluster(prefill=0, decode=0, stores=0, router_args=["--queue-timeout", "2"]) as c:
        t0 = time.monotonic()
        st, js = c.completion({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        waited = time.monotonic() - t0
        assert st == 503, (st, js)
        assert "no node" in js["error"]["message"]
        assert 1.5 < waited < 10, waited
        report(f"empty pool: 503 after {waited:.1f} s (--queue-timeout 2): "
               f"{js['error']['message']}")


def test_every_role_metrics_parse(report):
    """Every role's /metrics parses with prometheus_client's text parser and
    carries the vLLM-named series where the idea is the same."""
    parser = pytest.importorskip("prometheus_client.parser")
    import http.client
    with Cluster(prefill=1, decode=1, stores=1, router_args=["--disagg-min-tokens", "0"]) as c:
        c.chat("Say hi.", max_tokens=4)
        want = {
            "router": {"vllm:num_requests_running", "vllm:num_requests_waiting",
                       "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                       "tandem_router_pending_requests"},
            "prefill": {"vllm:num_requests_running", "vllm:prompt_tokens_total",
                        "vllm:prefix_cache_queries_total", "vllm:kv_cache_usage_perc"},
            "decode": {"vllm:num_requests_running", "vllm:num_requests_waiting",
                       "vllm:generation_tokens_total", "vllm:kv_cache_usage_perc"},
            "kvstore": set(),
        }
        counts = []
        for role, names in want.items():
            p = c.get(role)
            conn = http.client.HTTPConnection("127.0.0.1", p.health_port, timeout=5)
            conn.request("GET", "/metrics")
            body = conn.getresponse().read().decode()
            conn.close()
            fams = {f.name for f in parser.text_string_to_metric_families(body)}
            # the parser drops _total from counter family names
            fams |= {f + "_total" for f in fams}
            missing = names - fams
            assert not missing, f"{role} lacks {missing}"
            counts.append(f"{role} {len(fams) // 2}")
        report("metrics families parsed: " + ", ".join(counts))
