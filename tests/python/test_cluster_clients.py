"""Real clients no one here wrote, against a cluster started by `tandem up`
(1 prefill, 1 decode, 1 store, API key on; `tandem down` at the end): the `openai` Python SDK (completions, chat,
streaming, errors) and a grpcio client generated from proto/ (the suite in
test_grpc_client.py, run against this cluster). Also bad input through the
HTTP API against the real core: each gets its 4xx and the cluster keeps
serving."""

import os
import socket
import subprocess
import sys
import time

import pytest

from cluster import HERE, TandemUp, default_model, sanitized

pytestmark = pytest.mark.skipif(not os.path.exists(default_model()) or sanitized(),
                                reason="needs the default model and the Release build")

openai = pytest.importorskip("openai")
KEY = "test-key-123"


@pytest.fixture(scope="module")
def cluster():
    with TandemUp(prefill=1, decode=1, stores=1, api_key=KEY) as c:
        st, procs = c.status()
        assert st == 0 and len(procs) == 4 and all(p["healthy"] for p in procs), procs
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.http_port}/v1", api_key=KEY,
                         max_retries=0, timeout=120)


def model_id(client):
    return client.models.list().data[0].id


def test_sdk_models_chat_completions(client):
    mid = model_id(client)
    chat = client.chat.completions.create(model=mid, max_tokens=16, temperature=0,
                                          messages=[{"role": "user", "content": "Say hello."}])
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0
    comp = client.completions.create(model=mid, prompt="The capital of France is",
                                     max_tokens=8, temperature=0)
    assert comp.choices[0].text
    assert comp.usage.total_tokens == comp.usage.prompt_tokens + comp.usage.completion_tokens


def test_sdk_streaming_equals_unary(client):
    mid = model_id(client)
    msgs = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model=mid, max_tokens=24, temperature=0,
                                           messages=msgs)
    parts, finishes, ids, usage = [], [], set(), None
    stream = client.chat.completions.create(model=mid, max_tokens=24, temperature=0,
                                            messages=msgs, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            if ch.finish_reason:
                finishes.append(ch.finish_reason)
    assert "".join(parts) == whole.choices[0].message.content
    assert len(finishes) == 1 and len(ids) == 1
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_sdk_errors(cluster, client):
    mid = model_id(client)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=mid, prompt="word " * 9000, max_tokens=4)
    assert "maximum context length" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=mid, prompt="hi", max_tokens=0)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_bad_input_http(cluster):
    c = cluster
    cases = [
        (b"{not json", 400),
        (b'{"messages": "hello", "max_tokens": 4}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "four"}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', 400),
        (b'{"messages": [{"role": "user", "content": "\xff\xfe"}], "max_tokens": 4}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}', 400),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}', 404),
    ]
    for body, want in cases:
        st, data = c.request("POST", "/v1/chat/completions", body)
        assert st == want, (body, st, data)
        assert b'"error"' in data and b'"message"' in data, data
    # an oversized body: refused with 413 (the server may stop reading early)
    s = socket.create_connection(("127.0.0.1", c.http_port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
              + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
              b"Content-Length: 5242880\r\n\r\n")
    try:
        for _ in range(80):
            s.sendall(b"x" * 65536)
    except OSError:
        pass
    assert s.recv(4096).startswith(b"HTTP/1.1 413"), "no 413 for a 5 MiB body"
    s.close()
    st, _ = c.request("GET", "/v1/models", headers={"Authorization": "Bearer nope"})
    assert st == 401
    # a client that sends its headers slowly does not hold anyone up
    s = socket.create_connection(("127.0.0.1", c.http_port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    text, _ = c.chat("Say yes.", max_tokens=4)
    assert time.monotonic() - t0 < 30 and text
    s.close()


def test_grpc_client_suite(cluster):
    env = dict(os.environ, TANDEM_GRPC_ADDR=f"127.0.0.1:{cluster.grpc_port}",
               TANDEM_GRPC_API_KEY=KEY)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.join(HERE, "test_grpc_client.py")],
                       env=env, capture_output=True, timeout=600)
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0, out[-4000:]
    assert " passed" in out and "skipped" not in out.splitlines()[-1], out[-2000:]
