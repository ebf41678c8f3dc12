"""The router's gRPC API (proto/generation.proto) with a real gRPC client.

Runs against a live router: TANDEM_GRPC_ADDR=host:port (skipped when
unset). Optional: TANDEM_GRPC_API_KEY (sent as "authorization: Bearer KEY"),
TANDEM_GRPC_MODEL (default: the first model ListModels names).

The Python stubs are generated from the proto with grpc_tools.protoc into a
temporary directory at test time, so they always match the proto in the
tree.

    TANDEM_GRPC_ADDR=127.0.0.1:8001 .venv/bin/python -m pytest tests/python/test_grpc_client.py
"""

import importlib
import os
import sys
import tempfile

import pytest

ADDR = os.environ.get("TANDEM_GRPC_ADDR", "")
if not ADDR:
    pytest.skip("TANDEM_GRPC_ADDR is not set (host:port of a running tandem-router's gRPC API)",
                allow_module_level=True)

grpc = pytest.importorskip("grpc")
protoc = pytest.importorskip("grpc_tools.protoc")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(REPO, "proto")
TIMEOUT = 120.0  # seconds for one call: a cold pool may have to wake up


@pytest.fixture(scope="module")
def pb():
    """(generation_pb2, generation_pb2_grpc), generated from the tree's proto."""
    with tempfile.TemporaryDirectory(prefix="tandem-grpc-stubs-") as out:
        rc = protoc.main([
            "grpc_tools.protoc",
            "-I" + PROTO_DIR,
            "--python_out=" + out,
            "--grpc_python_out=" + out,
            os.path.join(PROTO_DIR, "generation.proto"),
        ])
        assert rc == 0, "grpc_tools.protoc failed on proto/generation.proto"
        sys.path.insert(0, out)
        try:
            for name in ("generation_pb2", "generation_pb2_grpc"):
                sys.modules.pop(name, None)
            msgs = importlib.import_module("generation_pb2")
            stubs = importlib.import_module("generation_pb2_grpc")
        finally:
            sys.path.remove(out)
        yield msgs, stubs


@pytest.fixture(scope="module")
def stub(pb):
    _, stubs = pb
    channel = grpc.insecure_channel(ADDR)
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
    except grpc.FutureTimeoutError:
        pytest.fail("cannot connect to the gRPC API at %s within 30 s" % ADDR)
    yield stubs.GenerationStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def md():
    key = os.environ.get("TANDEM_GRPC_API_KEY", "")
    return (("authorization", "Bearer " + key),) if key else ()


@pytest.fixture(scope="module")
def model(pb, stub, md):
    msgs, _ = pb
    name = os.environ.get("TANDEM_GRPC_MODEL", "")
    if name:
        return name
    resp = stub.ListModels(msgs.ListModelsRequest(), metadata=md, timeout=TIMEOUT)
    assert resp.models, "ListModels names no model"
    return resp.models[0].name


def request(pb, model, **kw):
    msgs, _ = pb
    kw.setdefault("max_tokens", 8)
    req = msgs.GenerateRequest(model=model, **kw)
    if "temperature" not in kw:
        req.temperature = 0.0  # greedy: comparable answers
    return req


def test_health(pb, stub):
    msgs, _ = pb
    resp = stub.Health(msgs.HealthRequest(), timeout=TIMEOUT)
    assert resp.status == msgs.HealthResponse.SERVING, resp.reason


def test_list_models(pb, stub, md):
    msgs, _ = pb
    resp = stub.ListModels(msgs.ListModelsRequest(), metadata=md, timeout=TIMEOUT)
    assert len(resp.models) >= 1
    for m in resp.models:
        assert m.name
        assert m.max_model_len > 0


def test_generate(pb, stub, md, model):
    req = request(pb, model, prompt="The capital of France is", max_tokens=8,
                  request_id="pytest-generate")
    resp = stub.Generate(req, metadata=md, timeout=TIMEOUT)
    assert isinstance(resp.text, str)
    assert resp.finish_reason in ("stop", "length")
    assert resp.HasField("usage")
    assert 1 <= resp.usage.completion_tokens <= 8
    assert resp.usage.prompt_tokens > 0
    assert resp.request_id == "pytest-generate"
    if resp.finish_reason == "length":
        assert resp.usage.completion_tokens == 8


def test_stream_matches_unary(pb, stub, md, model):
    req = request(pb, model, prompt="Once upon a time", max_tokens=16)
    unary = stub.Generate(req, metadata=md, timeout=TIMEOUT)
    chunks = list(stub.GenerateStream(req, metadata=md, timeout=TIMEOUT))
    assert chunks, "the stream sent no message"
    assert "".join(c.text for c in chunks) == unary.text
    finishes = [i for i, c in enumerate(chunks) if c.finish_reason]
    assert finishes == [len(chunks) - 1], "finish_reason must be set once, on the last message"
    assert chunks[-1].finish_reason == unary.finish_reason
    usages = [i for i, c in enumerate(chunks) if c.HasField("usage")]
    assert usages == [len(chunks) - 1]
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens


def test_chat_messages(pb, stub, md, model):
    msgs, _ = pb
    req = request(pb, model, max_tokens=8, messages=[
        msgs.ChatMessage(role="system", content="You answer in one word."),
        msgs.ChatMessage(role="user", content="What colour is the sky?"),
    ])
    resp = stub.Generate(req, metadata=md, timeout=TIMEOUT)
    assert resp.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 10  # the template's tokens too


def test_prompt_token_ids_and_logprobs(pb, stub, md, model):
    req = request(pb, model, prompt_token_ids=[100, 200, 300], max_tokens=4, top_logprobs=2)
    resp = stub.Generate(req, metadata=md, timeout=TIMEOUT)
    assert resp.usage.prompt_tokens == 3
    n = resp.usage.completion_tokens
    assert len(resp.token_ids) == n
    assert len(resp.logprobs) == n
    for tok, lp in zip(resp.token_ids, resp.logprobs):
        assert lp.token == tok
        assert lp.logprob <= 0.0
        assert 1 <= len(lp.top_logprobs) <= 2


def test_seeded_sampling_repeats(pb, stub, md, model):
    req = request(pb, model, prompt="Pick a number:", max_tokens=8, temperature=0.8, seed=42)
    a = stub.Generate(req, metadata=md, timeout=TIMEOUT)
    b = stub.Generate(req, metadata=md, timeout=TIMEOUT)
    assert a.text == b.text


def expect_code(call, code):
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def test_invalid_argument(pb, stub, md, model):
    msgs, _ = pb
    bad = [
        (msgs.GenerateRequest(model=model, max_tokens=4), "prompt"),
        (request(pb, model, prompt="hi", max_tokens=-1), "max_tokens"),
        (request(pb, model, prompt="hi", prompt_token_ids=[1, 2]), "only one"),
        (request(pb, model, prompt_token_ids=[1 << 30]), "prompt_token_ids[0]"),
        (request(pb, model, messages=[msgs.ChatMessage(role="wizard", content="hi")]),
         "messages[0].role"),
        (request(pb, model, prompt="hi", temperature=-1.0), "temperature"),
        (request(pb, model, prompt="hi", top_logprobs=99), "top_logprobs"),
        (request(pb, model, prompt="a\x00b"), "prompt"),
    ]
    for req, field in bad:
        details = expect_code(lambda: stub.Generate(req, metadata=md, timeout=TIMEOUT),
                              grpc.StatusCode.INVALID_ARGUMENT)
        assert field in details


def test_invalid_argument_stream(pb, stub, md, model):
    req = request(pb, model, prompt="hi", max_tokens=-1)
    expect_code(lambda: list(stub.GenerateStream(req, metadata=md, timeout=TIMEOUT)),
                grpc.StatusCode.INVALID_ARGUMENT)


def test_not_found(pb, stub, md):
    req = request(pb, "no-such-model-here", prompt="hi")
    details = expect_code(lambda: stub.Generate(req, metadata=md, timeout=TIMEOUT),
                          grpc.StatusCode.NOT_FOUND)
    assert "no-such-model-here" in details


def test_unknown_method(stub, md):
    channel = grpc.insecure_channel(ADDR)
    try:
        nope = channel.unary_unary("/tandem.v1.Generation/Nope")
        expect_code(lambda: nope(b"", metadata=md, timeout=TIMEOUT),
                    grpc.StatusCode.UNIMPLEMENTED)
    finally:
        channel.close()


def test_cancel_stream_then_generate(pb, stub, md, model):
    req = request(pb, model, prompt="Tell me a long story", max_tokens=200)
    stream = stub.GenerateStream(req, metadata=md, timeout=TIMEOUT)
    next(stream)
    stream.cancel()
    try:
        for _ in stream:
            pass
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.CANCELLED, e.details()
    # (no error: the answer was complete before the cancel)
    # the router still answers
    resp = stub.Generate(request(pb, model, prompt="Hi", max_tokens=2), metadata=md,
                         timeout=TIMEOUT)
    assert resp.finish_reason in ("stop", "length")
