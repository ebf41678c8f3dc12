"""An independent numpy forward pass of a Llama-architecture GGUF model.

It is the yardstick that tandem's logits are checked against: the weights
are dequantized by the PyPI `gguf` package (not by tandem's code) and every
step of the forward pass is written out plainly in numpy, in float32 with
float64 for the reductions that matter (norms, softmax).

    model = load(path)
    logits(model, ids)        -> last position's logits, shape [n_vocab]
    greedy(model, ids, n)     -> (n generated ids, relative top-two gap per step)

Run it directly for a quick look:

    python reference.py MODEL.gguf 1 2 3 ...   (prints the argmax and top 5)
"""

import os
import sys
from dataclasses import dataclass, field

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def default_model_path():
    home = os.environ.get("TANDEM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "tandem")
    return os.path.join(home, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass
class Layer:
    attn_norm: np.ndarray  # [n_embd]
    wq: np.ndarray  # [n_head * head_dim, n_embd]
    wk: np.ndarray  # [n_head_kv * head_dim, n_embd]
    wv: np.ndarray  # [n_head_kv * head_dim, n_embd]
    wo: np.ndarray  # [n_embd, n_head * head_dim]
    ffn_norm: np.ndarray  # [n_embd]
    w_gate: np.ndarray  # [n_ff, n_embd]
    w_up: np.ndarray  # [n_ff, n_embd]
    w_down: np.ndarray  # [n_embd, n_ff]


@dataclass
class Model:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rope_theta: float
    rope_dims: int
    rms_eps: float
    add_bos: bool  # the tokenizer puts BOS before a prompt
    bos_id: int
    tok_embd: np.ndarray  # [n_vocab, n_embd]
    output_norm: np.ndarray  # [n_embd]
    output: np.ndarray  # [n_vocab, n_embd]; the embedding itself when tied
    layers: list = field(default_factory=list)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise KeyError("GGUF metadata key missing: " + key)
        return default
    return f.contents()


def _tensor(tensors, name):
    t = tensors.get(name)
    if t is None:
        raise KeyError("GGUF tensor missing: " + name)
    # dequantize() gives numpy order: rows = output features (GGUF ne[1]),
    # columns = input features (GGUF ne[0]).
    w = dequantize(t.data, t.tensor_type)
    return np.ascontiguousarray(w, dtype=np.float32)


def load(path=None):
    """Reads a llama GGUF and dequantizes every weight to float32."""
    path = path or default_model_path()
    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError("reference.py handles llama models only, not " + str(arch))
    tensors = {t.name: t for t in reader.tensors}

    n_embd = int(_field(reader, "llama.embedding_length"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_head_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    head_dim = n_embd // n_head
    tok_embd = _tensor(tensors, "token_embd.weight")
    output = _tensor(tensors, "output.weight") if "output.weight" in tensors else tok_embd

    model = Model(
        n_vocab=tok_embd.shape[0],
        n_embd=n_embd,
        n_layer=int(_field(reader, "llama.block_count")),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=int(_field(reader, "llama.feed_forward_length")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rope_dims=int(_field(reader, "llama.rope.dimension_count", head_dim)),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", -1)),
        tok_embd=tok_embd,
        output_norm=_tensor(tensors, "output_norm.weight"),
        output=output,
    )
    for i in range(model.n_layer):
        p = "blk.%d." % i
        model.layers.append(
            Layer(
                attn_norm=_tensor(tensors, p + "attn_norm.weight"),
                wq=_tensor(tensors, p + "attn_q.weight"),
                wk=_tensor(tensors, p + "attn_k.weight"),
                wv=_tensor(tensors, p + "attn_v.weight"),
                wo=_tensor(tensors, p + "attn_output.weight"),
                ffn_norm=_tensor(tensors, p + "ffn_norm.weight"),
                w_gate=_tensor(tensors, p + "ffn_gate.weight"),
                w_up=_tensor(tensors, p + "ffn_up.weight"),
                w_down=_tensor(tensors, p + "ffn_down.weight"),
            )
        )
    return model


def rms_norm(x, weight, eps):
    """x: [n, d]. Normalizes each row by its root mean square, then scales."""
    x64 = x.astype(np.float64)
    scale = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    return (x64 * scale).astype(np.float32) * weight


def rope(x, positions, theta, n_dims):
    """x: [n, heads, head_dim]. Rotates adjacent pairs (x[2i], x[2i+1]) by
    pos * theta^(-2i/n_dims), as GGUF llama models expect (GGML's normal mode).
    Dimensions past n_dims are left alone."""
    half = n_dims // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / n_dims)  # [half]
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # [n, half]
    cos = np.cos(angles)[:, None, :]
    sin = np.sin(angles)[:, None, :]
    out = x.astype(np.float64)  # a copy
    even = out[..., 0:n_dims:2].copy()
    odd = out[..., 1:n_dims:2].copy()
    out[..., 0:n_dims:2] = even * cos - odd * sin
    out[..., 1:n_dims:2] = even * sin + odd * cos
    return out.astype(np.float32)


def silu(x):
    return x / (1.0 + np.exp(-x))


class KVCache:
    """Per-layer K and V of every position seen so far (post-RoPE K)."""

    def __init__(self, model):
        self.k = [np.zeros((0, model.n_head_kv, model.head_dim), np.float32) for _ in range(model.n_layer)]
        self.v = [np.zeros((0, model.n_head_kv, model.head_dim), np.float32) for _ in range(model.n_layer)]

    @property
    def n_past(self):
        return self.k[0].shape[0]


def attention(q, k, v, n_past):
    """q: [n, n_head, hd]; k, v: [n_past + n, n_head_kv, hd]. Causal,
    grouped-query: query head h reads kv head h // (n_head / n_head_kv)."""
    n, n_head, hd = q.shape
    total, n_head_kv, _ = k.shape
    group = n_head // n_head_kv
    kv_of_head = np.arange(n_head) // group
    kh = k[:, kv_of_head, :].astype(np.float64)  # [total, n_head, hd]
    vh = v[:, kv_of_head, :].astype(np.float64)
    scores = np.einsum("qhd,khd->hqk", q.astype(np.float64), kh) / np.sqrt(hd)  # [n_head, n, total]
    # Query i sits at position n_past + i and may see keys 0 .. n_past + i.
    allowed = np.arange(total)[None, :] <= (n_past + np.arange(n))[:, None]  # [n, total]
    scores = np.where(allowed[None, :, :], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, vh)  # [n, n_head, hd]
    return out.reshape(n, n_head * hd).astype(np.float32)


def forward(model, token_ids, cache):
    """Runs the new tokens token_ids through the model after the positions
    already in cache (which it extends). Returns the logits of the last new
    position, float32 [n_vocab]."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError("token_ids must be a non-empty list of ids")
    if ids.min() < 0 or ids.max() >= model.n_vocab:
        raise ValueError("token id out of range")
    n = len(ids)
    n_past = cache.n_past
    positions = np.arange(n_past, n_past + n)
    hd = model.head_dim

    x = model.tok_embd[ids]  # [n, n_embd]
    for il, layer in enumerate(model.layers):
        h = rms_norm(x, layer.attn_norm, model.rms_eps)
        q = (h @ layer.wq.T).reshape(n, model.n_head, hd)
        k = (h @ layer.wk.T).reshape(n, model.n_head_kv, hd)
        v = (h @ layer.wv.T).reshape(n, model.n_head_kv, hd)
        q = rope(q, positions, model.rope_theta, model.rope_dims)
        k = rope(k, positions, model.rope_theta, model.rope_dims)
        cache.k[il] = np.concatenate([cache.k[il], k], axis=0)
        cache.v[il] = np.concatenate([cache.v[il], v], axis=0)
        a = attention(q, cache.k[il], cache.v[il], n_past)
        x = x + a @ layer.wo.T

        h = rms_norm(x, layer.ffn_norm, model.rms_eps)
        g = h @ layer.w_gate.T
        u = h @ layer.w_up.T
        x = x + (silu(g) * u) @ layer.w_down.T

    last = rms_norm(x[-1:], model.output_norm, model.rms_eps)[0]
    return (model.output @ last).astype(np.float32)


def logits(model, token_ids):
    """Last position's logits of a prompt, float32 [n_vocab]."""
    return forward(model, token_ids, KVCache(model))


def top_two(row):
    """(best id, runner-up id, relative gap (top1 - top2) / |top1|): how
    close the argmax came to a tie."""
    i2, i1 = np.argpartition(row, -2)[-2:]
    if row[i2] > row[i1] or (row[i2] == row[i1] and i2 < i1):
        i1, i2 = i2, i1
    top1, top2 = float(row[i1]), float(row[i2])
    return int(i1), int(i2), (top1 - top2) / max(abs(top1), 1e-30)


def greedy(model, token_ids, n):
    """Greedy continuation of n tokens with a KV cache (one forward for the
    prompt, then one per token). Returns (ids, gaps, runners_up): the n
    generated ids; for each step the relative gap between the top two logits
    that chose it, (top1 - top2) / |top1|; and each step's second choice."""
    cache = KVCache(model)
    row = forward(model, token_ids, cache)
    ids, gaps, runners_up = [], [], []
    for step in range(n):
        best, second, gap = top_two(row)
        ids.append(best)
        gaps.append(gap)
        runners_up.append(second)
        if step + 1 < n:
            row = forward(model, [best], cache)
    return ids, gaps, runners_up


def write_f32_copy(src, dst):
    """Writes a copy of the GGUF at src to dst with every tensor dequantized to
    F32 (metadata unchanged but general.file_type). llama.cpp run on the copy
    computes in float32 on exactly the reference's weights, which checks this
    module independently of any quantized kernel."""
    from gguf import GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch=_field(reader, "general.architecture"))
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_uint32(key, 0)  # all F32
        elif f.types[0] == GGUFValueType.ARRAY:
            writer.add_array(key, f.contents())
        else:
            writer.add_key_value(key, f.contents(), f.types[0])
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv):
    if len(argv) < 3:
        print("usage: reference.py MODEL.gguf ID [ID ...]", file=sys.stderr)
        return 2
    model = load(argv[1])
    row = logits(model, [int(a) for a in argv[2:]])
    top = np.argsort(row)[::-1][:5]
    print("argmax", int(top[0]))
    for t in top:
        print("%6d %10.4f" % (t, row[t]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
