"""A tandem cluster on loopback for the tests: kvstores, a router, prefill and
decode nodes as real processes, on free ports, with a random cluster token.
Every process is killed when the cluster is closed (also on test failure).

    with Cluster(prefill=1, decode=2, stores=2) as c:
        c.chat("Hello")           # OpenAI HTTP through the router
        c.kill("decode", 0)       # kill -9 a node
"""

import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def bin_dir():
    tb = os.environ.get("TANDEM_BIN")
    if tb:
        return os.path.dirname(tb)
    return os.path.join(REPO, "build", "bin")


def default_model():
    home = os.environ.get("TANDEM_HOME", os.path.expanduser("~/.cache/tandem"))
    return os.path.join(home, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def sanitized():
    return "build-asan" in bin_dir() or os.environ.get("TANDEM_TEST_SANITIZED") == "1"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path, timeout=2.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


class Proc:
    def __init__(self, role, index, argv, env, log_path, health_port, ready_path):
        self.role, self.index = role, index
        self.argv, self.env, self.log_path = argv, env, log_path
        self.health_port, self.ready_path = health_port, ready_path
        self.p = None

    def start(self):
        self.log = open(self.log_path, "ab")
        self.p = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=self.log,
                                  stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def ready(self):
        try:
            st, _ = http_get(self.health_port, self.ready_path, timeout=1.0)
            return st == 200
        except OSError:
            return False

    def signal(self, sig):
        if self.alive():
            os.kill(self.p.pid, sig)

    def wait(self, timeout):
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, n=30):
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""


class Cluster:
    def __init__(self, prefill=1, decode=1, stores=1, model=None, threads=1,
                 router_args=(), node_args=(), api_key=None, kv_replicas=1,
                 start_timeout=240):
        self.model = model or default_model()
        self.bin = bin_dir()
        self.dir = tempfile.mkdtemp(prefix="tandem-cluster-")
        self.token = secrets.token_hex(16)
        self.api_key = api_key
        self.procs = []
        self.start_timeout = start_timeout
        env = dict(os.environ, TANDEM_CLUSTER_TOKEN=self.token)
        env.pop("TANDEM_API_KEY", None)
        self.env = env
        self.store_addrs = []
        for i in range(stores):
            port, mport = free_port(), free_port()
            self.store_addrs.append(f"127.0.0.1:{port}")
            self._add("kvstore", i, [os.path.join(self.bin, "tandem-kvstore"),
                                     "--listen", f"127.0.0.1:{port}", "--capacity", "512MiB",
                                     "--metrics-host", "127.0.0.1", "--metrics-port", str(mport)],
                      mport, "/health")
        self.http_port, self.grpc_port, self.listen_port = free_port(), free_port(), free_port()
        argv = [os.path.join(self.bin, "tandem-router"), "--model", self.model,
                "--host", "127.0.0.1", "--port", str(self.http_port),
                "--grpc-host", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--listen", f"127.0.0.1:{self.listen_port}"] + list(router_args)
        if api_key:
            argv += ["--api-key", api_key]
        self._add("router", 0, argv, self.http_port, "/health")
        self.node_args = list(node_args)
        self.threads = threads
        self.kv_replicas = kv_replicas
        for i in range(prefill):
            self.add_node("prefill", start=False)
        for i in range(decode):
            self.add_node("decode", start=False)

    def _add(self, role, index, argv, port, ready_path):
        log = os.path.join(self.dir, f"{role}-{index}.log")
        p = Proc(role, index, argv, self.env, log, port, ready_path)
        self.procs.append(p)
        return p

    def add_node(self, role, start=True, extra=(), wrap=()):
        index = sum(1 for p in self.procs if p.role == role)
        mport = free_port()
        argv = list(wrap) + [os.path.join(self.bin, f"tandem-{role}"), "--model", self.model,
                "--router", f"127.0.0.1:{self.listen_port}", "--metrics-host", "127.0.0.1",
                "--metrics-port", str(mport), "--threads", str(self.threads),
                "--name", f"{role}-{index}", "--kv-cache-memory", "256MiB",
                "--kv-replicas", str(self.kv_replicas)]
        if self.store_addrs:
            argv += ["--kvstore", ",".join(self.store_addrs)]
        argv += self.node_args + list(extra)
        p = self._add(role, index, argv, mport, "/ready")
        if start:
            p.start()
            self._wait([p])
        return p

    def _wait(self, procs):
        deadline = time.monotonic() + self.start_timeout
        pending = list(procs)
        while pending:
            for p in list(pending):
                if not p.alive():
                    raise RuntimeError(f"{p.role}-{p.index} exited at start:\n{p.log_tail()}")
                if p.ready():
                    pending.remove(p)
            if time.monotonic() > deadline:
                names = ", ".join(f"{p.role}-{p.index}" for p in pending)
                raise RuntimeError(f"not ready in time: {names}\n" +
                                   "\n".join(p.log_tail() for p in pending))
            time.sleep(0.1)

    def start(self):
        order = ["kvstore", "router", "prefill", "decode"]
        for role in order:
            group = [p for p in self.procs if p.role == role and p.p is None]
            for p in group:
                p.start()
            self._wait(group)
        return self

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for p in self.procs:
            if p.alive():
                p.signal(signal.SIGKILL)
                p.wait(10)
            if getattr(p, "log", None):
                p.log.close()

    def get(self, role, index=0):
        return [p for p in self.procs if p.role == role][index]

    def kill(self, role, index=0, sig=signal.SIGKILL):
        p = self.get(role, index)
        p.signal(sig)
        return p

    def metrics(self, role, index=0):
        """Prometheus text of a process, as a dict name{labels} -> value."""
        p = self.get(role, index)
        st, body = http_get(p.health_port, "/metrics")
        assert st == 200
        out = {}
        for line in body.decode().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
        return out

    # ---- the OpenAI API, with the standard library only
    def request(self, method, path, body=None, headers=None, timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        h.update(headers or {})
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        try:
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def completion(self, body, path="/v1/chat/completions", timeout=120):
        st, data = self.request("POST", path, body, timeout=timeout)
        return st, json.loads(data)

    def chat(self, message, max_tokens=48, **kw):
        body = {"messages": [{"role": "user", "content": message}], "max_tokens": max_tokens,
                "temperature": 0, **kw}
        st, js = self.completion(body)
        assert st == 200, js
        return js["choices"][0]["message"]["content"], js

    def chat_stream(self, message, max_tokens=48, timeout=120, on_chunk=None, **kw):
        """Streamed chat completion: (joined text, list of chunk dicts);
        on_chunk(n) runs after the n-th chunk."""
        body = {"messages": [{"role": "user", "content": message}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, **kw}
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                         headers=h)
            r = conn.getresponse()
            assert r.status == 200, r.read()
            chunks, text, done = [], [], False
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    done = True
                    break
                js = json.loads(payload)
                chunks.append(js)
                if on_chunk:
                    on_chunk(len(chunks))
                for ch in js.get("choices", []):
                    text.append(ch.get("delta", {}).get("content") or "")
            assert done, "stream ended without [DONE]"
            return "".join(text), chunks
        finally:
            conn.close()


def tandem_generate(chat, max_tokens=48, model=None):
    """The same question answered by `tandem generate` (greedy)."""
    argv = [os.path.join(bin_dir(), "tandem"), "generate", "-m", model or default_model(),
            "--chat", chat, "-n", str(max_tokens), "--temp", "0", "--threads", "1"]
    out = subprocess.run(argv, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode("utf-8")
    return text[:-1] if text.endswith("\n") else text  # generate ends with a newline


class TandemUp(Cluster):
    """The same client helpers, over a cluster started by `tandem up` (and
    stopped by `tandem down`), as a user would run it."""

    def __init__(self, prefill=1, decode=1, stores=1, api_key=None, extra=(), start_timeout=240):
        self.model = default_model()
        self.bin = bin_dir()
        self.dir = tempfile.mkdtemp(prefix="tandem-up-")
        self.api_key = api_key
        self.procs = []
        self.counts = (prefill, decode, stores)
        self.extra = list(extra)
        self.start_timeout = start_timeout

    def _tandem(self, *args, timeout=300):
        env = dict(os.environ)
        env.pop("TANDEM_API_KEY", None)
        return subprocess.run([os.path.join(self.bin, "tandem"), *args], env=env,
                              capture_output=True, timeout=timeout)

    def start(self):
        p, d, s = self.counts
        for attempt in range(5):  # a port of the range may be taken meanwhile
            self.http_port, self.grpc_port = free_port(), free_port()
            base = 20000 + secrets.randbelow(10000)
            argv = ["up", "--run-dir", self.dir, "--prefill", str(p), "--decode", str(d),
                    "--kvstore", str(s), "-m", self.model, "--port", str(self.http_port),
                    "--grpc-port", str(self.grpc_port), "--port-base", str(base),
                    "--kv-capacity", "512MiB", "--timeout", str(self.start_timeout)]
            if self.api_key:
                argv += ["--api-key", self.api_key]
            r = self._tandem(*argv, *self.extra, timeout=self.start_timeout + 60)
            if r.returncode == 0:
                return self
            if b"is taken" not in r.stderr:
                break
        raise RuntimeError("tandem up failed:\n" + r.stderr.decode(errors="replace")[-4000:])

    def status(self):
        r = self._tandem("status", "--run-dir", self.dir, "--json", timeout=30)
        return r.returncode, json.loads(r.stdout or b"[]")

    def close(self):
        self._tandem("down", "--run-dir", self.dir, timeout=120)
