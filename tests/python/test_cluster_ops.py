"""Operations: a decode node drains on SIGTERM under load with no failed
request; at its drain timeout it hands what it holds back to the router;
`tandem drain` and spot-watch (against a fake cloud metadata endpoint) drain
a node; the router drains on SIGTERM; a router with an empty pool holds
requests until a node registers (scale from zero), or answers 503 after
--queue-timeout; every role's /metrics parses."""

import concurrent.futures as cf
import http.client
import http.server
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from cluster import Cluster, bin_dir, default_model, free_port, http_get, sanitized

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
            # ready with an empty pool: a load balancer keeps sending it requests to hold
            assert http_get(c.http_port, "/ready")[0] == 200
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


def long_stream(c, i, max_tokens, on_chunk=None):
    """A greedy stream that runs to max_tokens: (text, completion tokens)."""
    text, chunks = c.chat_stream(f"Tell a long story about the number {i}.", max_tokens=max_tokens,
                                 timeout=300, on_chunk=on_chunk, ignore_eos=True,
                                 stream_options={"include_usage": True})
    usage = chunks[-1].get("usage") or {}
    return text, usage.get("completion_tokens")


class ChunkGate:
    """Set once `want` streams have each seen `at` chunks."""

    def __init__(self, want, at):
        self.want, self.at, self.n = want, at, 0
        self.lock, self.event = threading.Lock(), threading.Event()

    def __call__(self, k):
        if k == self.at:
            with self.lock:
                self.n += 1
                if self.n == self.want:
                    self.event.set()


def tandem(*args, env=None, timeout=180):
    return subprocess.run([os.path.join(bin_dir(), "tandem"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_drain_timeout_hands_off(report):
    """`tandem drain` on a decode node whose --drain-timeout (1 s) is shorter
    than its streams: at the deadline it hands them back, the router
    re-sends them to the other node with the tokens so far, every stream
    completes with the text a single node gives, and the node exits 0."""
    with Cluster(prefill=0, decode=0, stores=0) as c:
        victim = c.add_node("decode", extra=["--drain-timeout", "1"])
        c.add_node("decode")
        addr = f"127.0.0.1:{victim.health_port}"
        env = dict(os.environ, TANDEM_CLUSTER_TOKEN="not-the-token")
        r = tandem("drain", addr, env=env)
        assert r.returncode == 1 and "cluster token" in r.stderr, (r.returncode, r.stderr)
        assert victim.ready(), "a drain with the wrong token must not drain"
        n, max_tokens = 8, 640
        gate = ChunkGate(n, 4)
        with cf.ThreadPoolExecutor(n) as ex:
            futs = [ex.submit(long_stream, c, i, max_tokens, gate) for i in range(n)]
            assert gate.event.wait(120)
            t0 = time.monotonic()
            r = tandem("drain", addr, "--wait", "--timeout", "60", env=dict(os.environ,
                       TANDEM_CLUSTER_TOKEN=c.token))
            took = time.monotonic() - t0
            results = [f.result() for f in futs]
        assert r.returncode == 0, r.stderr
        assert "drained and exited" in r.stdout, r.stdout
        assert victim.wait(10) == 0
        assert took < 1 + 10, f"the drain took {took:.1f} s with --drain-timeout 1"
        assert all(k == max_tokens for _, k in results), [k for _, k in results]
        log = open(victim.log_path, errors="replace").read()
        assert "drain asked: draining" in log
        handed = [ln for ln in log.splitlines() if "handed" in ln]
        assert handed, "the node finished everything within 1 s: the test proves nothing"
        m = c.metrics("router")
        assert m.get("tandem_router_handoffs_total", 0) >= 1, m
        assert m.get("tandem_router_requests_failed_total", 0) == 0, m
        # the same prompts on the node left, from scratch: the same greedy text
        with cf.ThreadPoolExecutor(n) as ex:
            again = list(ex.map(lambda i: long_stream(c, i, max_tokens), range(n)))
        same = sum(a[0] == b[0] for a, b in zip(results, again))
        assert same == n, f"{same} of {n} handed-off streams match a single node's text"
        report(f"drain timeout: tandem drain --wait on a decode node (--drain-timeout 1) under "
               f"{n} streams of {max_tokens} tokens: exit 0 after {took:.1f} s, "
               f"{int(m['tandem_router_handoffs_total'])} handed back, {n} of {n} complete with "
               f"the text one node gives; a wrong token is refused (401)")


def test_router_drains_on_sigterm(report):
    """SIGTERM on the router: /ready turns 503, new requests get 503, the
    streams in flight finish, then it exits 0."""
    with Cluster(prefill=0, decode=1, stores=0, router_args=["--drain-timeout", "60"]) as c:
        n, max_tokens = 4, 64
        gate = ChunkGate(n, 2)
        router = c.get("router")
        with cf.ThreadPoolExecutor(n) as ex:
            futs = [ex.submit(long_stream, c, i, max_tokens, gate) for i in range(n)]
            assert gate.event.wait(120)
            router.signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while http_get(c.http_port, "/ready")[0] != 503 and time.monotonic() < deadline:
                time.sleep(0.05)
            ready = http_get(c.http_port, "/ready")[0]
            st, js = c.completion({"messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 4})
            results = [f.result() for f in futs]
        rc = router.wait(30)
        assert ready == 503
        assert st == 503 and "shutting down" in js["error"]["message"], (st, js)
        assert all(k == max_tokens for _, k in results), [k for _, k in results]
        assert rc == 0, rc
        log = open(router.log_path, errors="replace").read()
        assert "drained: no request in flight" in log
        report(f"router drain: SIGTERM under {n} streams: /ready 503, a new request 503 "
               f"({js['error']['message']!r}), {n} of {n} streams complete, exit 0")


class FakeMetadata(http.server.ThreadingHTTPServer):
    """AWS instance metadata, the part spot-watch reads: an IMDSv2 token
    (PUT /latest/api/token) and spot/instance-action, 404 until `notice`."""

    daemon_threads = True
    TOKEN = "imds-token-1"

    def __init__(self):
        self.notice = False
        self.token_puts = 0
        self.polls = []  # the token header each poll carried
        super().__init__(("127.0.0.1", 0), FakeMetadataHandler)

    def url(self, path):
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class FakeMetadataHandler(http.server.BaseHTTPRequestHandler):
    def _send(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        if (self.path == "/latest/api/token" and
                self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")):
            self.server.token_puts += 1
            return self._send(200, FakeMetadata.TOKEN.encode())
        self._send(400)

    def do_GET(self):
        if self.path != "/latest/meta-data/spot/instance-action":
            return self._send(404)
        tok = self.headers.get("X-aws-ec2-metadata-token")
        self.server.polls.append(tok)
        if tok != FakeMetadata.TOKEN:
            return self._send(401)
        if not self.server.notice:
            return self._send(404, b"Not Found")
        self._send(200, json.dumps({"action": "terminate",
                                    "time": "2026-11-28T12:00:00Z"}).encode())

    def log_message(self, *args):
        pass


def test_spot_watch_drains_on_notice(report):
    """deploy/ops/spot-watch polls a fake AWS metadata endpoint: nothing
    happens while spot/instance-action is 404; once it answers, the watched
    decode node drains under load (no failed request) and exits 0, and so
    does spot-watch."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "ops", "spot-watch")
    meta = FakeMetadata()
    threading.Thread(target=meta.serve_forever, daemon=True).start()
    watcher = None
    try:
        with Cluster(prefill=0, decode=2, stores=0) as c:
            victim = c.get("decode", 0)
            env = dict(os.environ, TANDEM_BIN=os.path.join(bin_dir(), "tandem"),
                       TANDEM_CLUSTER_TOKEN=c.token)
            watcher = subprocess.Popen(
                [script, "--url", meta.url("/latest/meta-data/spot/instance-action"),
                 "--token-url", meta.url("/latest/api/token"),
                 "--node", f"127.0.0.1:{victim.health_port}", "--interval", "0.2",
                 "--drain-timeout", "90"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = time.monotonic() + 30
            while len(meta.polls) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            quiet_polls = len(meta.polls)
            assert quiet_polls >= 3, "spot-watch does not poll"
            assert watcher.poll() is None and victim.ready(), "drained without a notice"
            n = 12
            gate = ChunkGate(n, 3)
            with cf.ThreadPoolExecutor(n) as ex:
                futs = [ex.submit(long_stream, c, i, 200, gate) for i in range(n)]
                assert gate.event.wait(120)
                t0 = time.monotonic()
                meta.notice = True
                out, _ = watcher.communicate(timeout=120)
                took = time.monotonic() - t0
                results = [f.result() for f in futs]
            assert watcher.returncode == 0, out
            assert victim.wait(10) == 0
            assert all(k == 200 for _, k in results), [k for _, k in results]
            assert "interruption notice" in out and "every node drained" in out, out
            assert meta.token_puts >= 1 and all(t == FakeMetadata.TOKEN for t in meta.polls)
            log = open(victim.log_path, errors="replace").read()
            assert "drain asked: draining" in log
            assert c.metrics("router").get("tandem_router_requests_failed_total", 0) == 0
        report(f"spot-watch: {quiet_polls} quiet polls (IMDSv2 token), then a notice: the "
               f"watched decode node drained under {n} streams and exited 0 {took:.1f} s later; "
               f"{n} of {n} complete")
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
            watcher.wait(10)
        meta.shutdown()
        meta.server_close()
