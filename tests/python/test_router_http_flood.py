"""The router's HTTP front end against slow and idle clients (issue 13).

A router with one decode node (loopback, random ports) and a separate
health port (--health-port). The first test holds 700 slowloris connections
(8 bytes of a never-ending header every 2 s) and 2,000 idle connections
against the API port, reopening each one the router closes, and meanwhile
sends normal requests (a chat completion, /v1/models, /tokenize) to the API
port and /health and /ready to both ports, printing their latency: every one
must answer. The attack comes from 100 loopback addresses (127.0.0.2 ..
127.0.0.101), so the per-address limit does not stop it and the connection
limit (--max-connections 1000) and the header deadline (--header-timeout 4)
have to: the router's metrics must show both at work.

The other tests look at one rule each: the per-address limit, the header
deadline of a slow header, the minimum rate of a slow body, and which paths
need the API key.

Every socket is closed and every process killed at the end; each wait has a
timeout. Under a sanitized build (build-asan, TANDEM_TEST_SANITIZED=1) the
flood is the same size and lasts the same time; only the latency bound is
looser.
"""

import collections
import http.client
import json
import os
import resource
import select
import selectors
import socket
import statistics
import time

import pytest

from cluster import Cluster, bin_dir, default_model, free_port, sanitized

KEY = "flood-test-key"
N_SLOW = 700  # slowloris connections
N_IDLE = 2000  # connections that send nothing
N_SOURCES = 100  # attacking addresses: 127.0.0.2 ..
MAX_CONN = 1000  # --max-connections
PER_IP = 64  # --max-connections-per-ip
HEADER_S = 4  # --header-timeout
FLOOD_S = 20  # how long the probes run under the flood
SLOW_EVERY_S = 2.0  # a slowloris connection sends 8 bytes this often
REOPEN_S = 1.0  # the attacker reopens a connection the server closed this much later
# what a slowloris connection sends, 8 bytes at a time: a request line, then
# one header line after another, never the blank line that ends them
SLOW_CHUNKS = [b"GET / HT", b"TP/1.1\r\n", b"X-a: b\r\n"]
PROBE_TIMEOUT = 10.0  # one probe request
LATENCY_BOUND = 5.0 if sanitized() else 2.0  # the slowest probe allowed (s)

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(bin_dir(), "tandem-router")) or not os.path.exists(default_model()),
    reason="tandem-router or the default model is missing (make; make model)")


def _raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@pytest.fixture(scope="module")
def router():
    if _raise_nofile(N_SLOW + N_IDLE + 1024) < N_SLOW + N_IDLE + 256:
        pytest.skip("the open files limit is too low for the flood")
    health = free_port()
    args = ["--health-port", str(health), "--max-connections", str(MAX_CONN),
            "--max-connections-per-ip", str(PER_IP), "--header-timeout", str(HEADER_S),
            "--log-level", "info"]
    with Cluster(prefill=0, decode=1, stores=0, api_key=KEY, router_args=args) as c:
        c.health_port = health
        yield c
        with open(c.get("router").log_path, errors="replace") as f:
            log = f.read()
    # the router logs its limit of open files (raised to the hard one)
    assert "open files limit" in log, log[-4000:]


def _get(port, path, key=None, timeout=PROBE_TIMEOUT, src="127.0.0.1"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(src, 0))
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _post(port, path, body, key=None, timeout=PROBE_TIMEOUT):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=h)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _metrics(port):
    st, body = _get(port, "/metrics")
    assert st == 200
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Flood:
    """N_SLOW slowloris and N_IDLE idle connections from N_SOURCES loopback
    addresses; step() sends the slow bytes that are due, notices the
    connections the server closed and reopens them."""

    def __init__(self, port):
        self.port = port
        self.sel = selectors.DefaultSelector()
        self.socks = {}  # socket -> [kind, source, next send time, chunks sent]
        self.reopened = 0
        self.closed_by_server = 0
        self.pending = collections.deque()  # (when, kind, source) to reopen
        self.n = 0
        for _ in range(N_SLOW):
            self._open("slow")
        for _ in range(N_IDLE):
            self._open("idle")

    def _open(self, kind, src=None):
        if src is None:
            src = f"127.0.0.{2 + self.n % N_SOURCES}"
            self.n += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind((src, 0))
        s.connect_ex(("127.0.0.1", self.port))
        # a slowloris starts its request at once and adds 8 bytes later
        self.socks[s] = [kind, src, time.monotonic() if kind == "slow" else float("inf"), 0]
        self.sel.register(s, selectors.EVENT_READ)

    def _drop(self, s, reopen=True):
        kind, src = self.socks.pop(s)[:2]
        self.sel.unregister(s)
        s.close()
        if reopen:
            self.pending.append((time.monotonic() + REOPEN_S, kind, src))

    def step(self, wait=0.05):
        now = time.monotonic()
        while self.pending and self.pending[0][0] <= now:
            _, kind, src = self.pending.popleft()
            self.reopened += 1
            self._open(kind, src)
        for s, st in list(self.socks.items()):
            if st[2] <= now:
                msg = SLOW_CHUNKS[min(st[3], len(SLOW_CHUNKS) - 1)]
                try:
                    s.send(msg)
                    st[3] += 1
                    st[2] = now + SLOW_EVERY_S
                except BlockingIOError:
                    st[2] = now + 0.2  # still connecting
                except OSError:
                    self.closed_by_server += 1
                    self._drop(s)
        for key, _ in self.sel.select(timeout=wait):
            s = key.fileobj
            if s not in self.socks:
                continue
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # closed by the server (or an answer, which ends too)
                self.closed_by_server += 1
                self._drop(s)

    def close(self):
        for s in list(self.socks):
            self._drop(s, reopen=False)
        self.sel.close()


def test_slowloris_and_idle_flood(router, report):
    c = router
    hp = c.health_port
    before = _metrics(hp)
    flood = Flood(c.http_port)
    lat = {k: [] for k in ("chat", "models", "tokenize", "api /health", "health-port /health",
                           "health-port /ready", "health-port /metrics")}
    server_open = []  # the router's open API connections, from its metrics

    def scrape():
        st, body = _get(hp, "/metrics")
        for line in body.decode().splitlines():
            if line.startswith("tandem_router_http_connections "):
                server_open.append(float(line.split()[1]))
        return st, body

    failures = []
    try:
        # let the flood fill the server first
        t_end = time.monotonic() + 3
        while time.monotonic() < t_end:
            flood.step()
        t_end = time.monotonic() + FLOOD_S
        probes = [
            ("chat", lambda: _post(c.http_port, "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "Hi"}],
                                    "max_tokens": 4, "temperature": 0}, key=KEY)),
            ("models", lambda: _get(c.http_port, "/v1/models", key=KEY)),
            ("tokenize", lambda: _post(c.http_port, "/tokenize", {"prompt": "Hello there"}, key=KEY)),
            ("api /health", lambda: _get(c.http_port, "/health")),
            ("health-port /health", lambda: _get(hp, "/health")),
            ("health-port /ready", lambda: _get(hp, "/ready")),
            ("health-port /metrics", scrape),
        ]
        i = 0
        while time.monotonic() < t_end:
            name, fn = probes[i % len(probes)]
            i += 1
            t0 = time.monotonic()
            try:
                st, body = fn()
            except OSError as e:
                st, body = -1, repr(e).encode()
            dt = time.monotonic() - t0
            lat[name].append(dt)
            if st != 200:
                failures.append(f"{name}: {st} {body[:200]!r} after {dt:.2f} s")
            # the attacker keeps going between probes
            t_next = time.monotonic() + 0.1
            while time.monotonic() < t_next:
                flood.step(wait=0.02)
    finally:
        reopened = flood.reopened
        flood.close()
    after = _metrics(hp)

    def closed_by(reason):
        k = f'tandem_router_http_connections_closed_total{{reason="{reason}"}}'
        return after.get(k, 0) - before.get(k, 0)

    for name, xs in lat.items():
        if xs:
            report(f"flood ({N_SLOW} slowloris + {N_IDLE} idle): {name}: {len(xs)} requests, "
                   f"median {statistics.median(xs) * 1000:.0f} ms, max {max(xs) * 1000:.0f} ms")
    report(f"flood: the router held {min(server_open):.0f}..{max(server_open):.0f} API "
           f"connections; it closed {closed_by('limit'):.0f} idle ones for new ones over "
           f"--max-connections {MAX_CONN}, {closed_by('header_timeout'):.0f} at the header "
           f"deadline; the attacker reopened {reopened}")
    assert not failures, "requests failed under the flood:\n" + "\n".join(failures)
    for name, xs in lat.items():
        assert xs, f"no {name} probe ran"
        assert max(xs) < LATENCY_BOUND, f"{name}: slowest answer {max(xs):.2f} s"
    # the attack was real: the router was full and had to close idle
    # connections for new ones (test_header_deadline covers the deadline)
    assert closed_by("limit") > 0, "the connection limit never closed an idle connection"
    assert max(server_open) >= MAX_CONN * 0.9, f"the router held at most {max(server_open)}"
    assert max(server_open) <= MAX_CONN * 1.25 + 16


def _wait_closed(s, timeout):
    """Seconds until the server closed s (recv gives b"" or an error), or None."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - t0 < timeout:
        try:
            if s.recv(4096) == b"":
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - t0
    return None


def test_per_address_limit(router):
    c = router
    socks = []
    try:
        for _ in range(PER_IP + 16):
            s = socket.create_connection(("127.0.0.1", c.http_port), timeout=5,
                                         source_address=("127.0.0.250", 0))
            socks.append(s)
        # over the limit: closed at accept; the others wait for their headers
        time.sleep(1.0)
        n_closed = 0
        for s in socks:
            r, _, _ = select.select([s], [], [], 0)
            try:
                n_closed += bool(r) and s.recv(4096, socket.MSG_DONTWAIT) == b""
            except OSError:
                n_closed += 1
        assert n_closed == 16, f"{n_closed} of {PER_IP + 16} connections from one address closed"
        # another address is served meanwhile
        assert _get(c.http_port, "/v1/models", key=KEY)[0] == 200
    finally:
        for s in socks:
            s.close()


def test_header_deadline(router):
    c = router
    with socket.create_connection(("127.0.0.1", c.http_port), timeout=5) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\n")
        t0 = time.monotonic()
        took = None
        while time.monotonic() - t0 < HEADER_S + 3:
            s.sendall(b"X-a: b\r\n")  # a byte now and then does not extend the deadline
            took = _wait_closed(s, 0.5)
            if took is not None:
                took = time.monotonic() - t0
                break
        assert took is not None, "a header sent 8 bytes at a time was never cut off"
        assert HEADER_S - 1 <= took <= HEADER_S + 2, f"closed after {took:.1f} s"


def test_slow_body(router):
    c = router
    with socket.create_connection(("127.0.0.1", c.http_port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                  KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{")
        t0 = time.monotonic()
        took = None
        while time.monotonic() - t0 < 2 * HEADER_S + 4:
            try:
                s.sendall(b" " * 16)  # 32 bytes/s, under the 1 KiB/s floor
            except OSError:
                took = time.monotonic() - t0
                break
            if _wait_closed(s, 0.5) is not None:
                took = time.monotonic() - t0
                break
        assert took is not None, "a body sent at 32 bytes/s was never cut off"
        # the grace is --header-timeout, then 1 KiB/s on average
        assert HEADER_S <= took <= HEADER_S + 3, f"closed after {took:.1f} s"


def test_api_key_and_limits(router):
    c = router
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]})):
        st, data = _post(c.http_port, path, body)
        assert st == 401, (path, st, data)
        assert json.loads(data)["error"]["code"] == "invalid_api_key"
        st, data = _post(c.http_port, path, body, key="wrong")
        assert st == 401, (path, st, data)
        st, data = _post(c.http_port, path, body, key=KEY)
        assert st == 200, (path, st, data)
    assert _get(c.http_port, "/v1/models")[0] == 401
    for port in (c.http_port, c.health_port):
        for path in ("/health", "/ready", "/metrics"):
            st, _ = _get(port, path)
            assert st == 200, (port, path, st)
    # /tokenize takes what a whole context needs, not 4 MiB: refused on its
    # Content-Length, before the body is read
    with socket.create_connection(("127.0.0.1", c.http_port), timeout=5) as s:
        s.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), data[:300]
    assert "/tokenize" in json.loads(body)["error"]["message"], body
