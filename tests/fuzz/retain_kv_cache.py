"""retain-kv-cache: a toy GPT with a concat-grown cache, compared through one decode step."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzz.builder import BOOL, F32, I64, Builder, Case, binary


@st.composite
def retain_kv_cache_cases(draw: Any) -> Case:
    """A toy GPT: embeddings, 1-2 attention layers with a concat-grown cache and an attention_mask input."""
    from passes import RetainKvCache

    opset = draw(st.sampled_from([13, 14, 17, 18]))
    heads, head_dim, vocab = draw(st.sampled_from([1, 2, 3, 4])), draw(st.integers(1, 3)), draw(st.integers(2, 6))
    # Grouped KV heads: the cache holds kv_heads, repeated after it; the repeat's shapes read off the past's length
    # (dynamo: past_len + seq_len) or off the grown cache (Shape of the Concat)
    kv_heads = draw(st.sampled_from([k for k in (1, 2, heads) if heads % k == 0]))
    repeat_form = draw(st.sampled_from(["past_len", "present_shape"])) if kv_heads < heads else "none"
    layers = draw(st.integers(1, 2))
    hidden = heads * head_dim
    ctx = draw(st.integers(2, 8))
    scale_form = draw(st.sampled_from(["mul", "div", "none"]))
    mask_form = draw(st.sampled_from(["where", "additive"]))
    logits_form = draw(st.sampled_from(["matmul", "matmul_add"]))
    tags = [
        f"opset={opset}",
        f"heads={heads}",
        f"kv_heads={kv_heads}",
        f"repeat={repeat_form}",
        f"head_dim={head_dim}",
        f"layers={layers}",
        scale_form,
        mask_form,
        logits_form,
    ]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    b = Builder(opset, const_nodes=draw(st.booleans()))
    ids = b.input("input_ids", I64, ["batch", "seq_len"])
    am = b.input("attention_mask", I64, ["batch", "total_len"])
    pos = b.input("position_ids", I64, ["batch", "seq_len"])
    pasts = []
    for i in range(layers):
        pasts.append((b.input(f"past_key.{i}", F32, ["batch", kv_heads, "past_len", head_dim]),
                      b.input(f"past_value.{i}", F32, ["batch", kv_heads, "past_len", head_dim])))  # fmt: skip
    wte = b.const(rng.standard_normal((vocab, hidden)).astype(np.float32), np.float32, as_node=False)
    wpe = b.const(rng.standard_normal((ctx + 2, hidden)).astype(np.float32), np.float32, as_node=False)
    h = b.op("Add", [b.op("Gather", [wte, ids]), b.op("Gather", [wpe, pos])])
    presents = []
    split = b.const([0, 0, heads, head_dim], np.int64)
    kv_split = b.const([0, 0, kv_heads, head_dim], np.int64)
    for i in range(layers):

        def heads_of(t: str, shape: str = split) -> str:
            return b.op("Transpose", [b.op("Reshape", [t, shape])], perm=[0, 2, 1, 3])

        def repeat(t: str, past: str) -> str:
            """query head j reads KV head j // (heads / kv_heads)"""
            full = b.op("Shape", [t if repeat_form == "present_shape" else past])
            batch, length = (b.op("Gather", [full, b.const([d], np.int64)], axis=0) for d in (0, 2))
            if repeat_form == "past_len":  # total = past_len + seq_len
                length = b.op("Add", [length, b.op("Gather", [b.op("Shape", [ids]), b.const([1], np.int64)], axis=0)])
            dim = b.const([head_dim], np.int64)
            wide = b.op("Concat", [batch, b.const([kv_heads, heads // kv_heads], np.int64), length, dim], axis=0)
            flat = b.op("Concat", [batch, b.const([heads], np.int64), length, dim], axis=0)
            return b.op("Reshape", [b.op("Expand", [b.unsqueeze(t, [2]), wide]), flat])

        # Weights of scale 1/sqrt(hidden) keep activations O(1), as a trained model's are: the additive
        # mask (-10000) hides a slot only while scores stay far below 10000.
        wq, wk, wv = (b.const((rng.standard_normal((hidden, hidden)) / math.sqrt(hidden)).astype(np.float32), np.float32, as_node=False)
                      for _ in range(3))  # fmt: skip
        if kv_heads < heads:
            wk, wv = (b.const((rng.standard_normal((hidden, kv_heads * head_dim)) / math.sqrt(hidden)).astype(np.float32), np.float32,
                              as_node=False) for _ in range(2))  # fmt: skip
        q = heads_of(b.op("MatMul", [h, wq]))
        k, v = (heads_of(b.op("MatMul", [h, w]), kv_split) for w in (wk, wv))
        pk = b.op("Concat", [pasts[i][0], k], axis=-2, out=f"present_key.{i}")
        pv = b.op("Concat", [pasts[i][1], v], axis=-2, out=f"present_value.{i}")
        presents += [pk, pv]
        rk, rv = (repeat(t, pasts[i][0]) for t in (pk, pv)) if kv_heads < heads else (pk, pv)
        scores = b.op("MatMul", [q, b.op("Transpose", [rk], perm=[0, 1, 3, 2])])
        if scale_form == "mul":
            scores = binary(b, draw, "Mul", scores, b.const(1 / math.sqrt(head_dim), np.float32))
        elif scale_form == "div":
            scores = b.op("Div", [scores, b.const(math.sqrt(head_dim), np.float32)])
        am4 = b.unsqueeze(am, [1, 2])
        if mask_form == "where":
            masked = b.op("Where", [b.op("Cast", [am4], to=BOOL), scores, b.const(-10000.0, np.float32)])
        else:
            bias = b.op("Mul", [b.op("Sub", [b.const(1.0, np.float32), b.op("Cast", [am4], to=F32)]), b.const(-10000.0, np.float32)])
            masked = binary(b, draw, "Add", scores, bias)
        probs = b.op("Softmax", [masked], axis=-1)
        attn = b.op("MatMul", [probs, rv])
        merged = b.op("Reshape", [b.op("Transpose", [attn], perm=[0, 2, 1, 3]), b.const([0, 0, hidden], np.int64)])
        wo = b.const((rng.standard_normal((hidden, hidden)) / math.sqrt(hidden)).astype(np.float32), np.float32, as_node=False)
        h = b.op("Add", [h, b.op("MatMul", [merged, wo])])
    head = b.const(rng.standard_normal((hidden, vocab)).astype(np.float32), np.float32, as_node=False)
    if logits_form == "matmul":
        logits = b.op("MatMul", [h, head], out="logits")
    else:
        logits = b.op("Add", [b.op("MatMul", [h, head]), b.const(rng.standard_normal(vocab).astype(np.float32), np.float32)], out="logits")
    b.output(logits, F32, ["batch", "seq_len", vocab])
    for i in range(layers):
        for role in ("key", "value"):
            b.output(f"present_{role}.{i}", F32, ["batch", kv_heads, "total_len", head_dim])
    past_len = draw(st.integers(0, ctx - 1))
    batch = draw(st.integers(1, 2))
    kv = {"ctx": ctx, "past_len": past_len, "batch": batch, "vocab": vocab, "heads": kv_heads, "head_dim": head_dim, "layers": layers,
          "seed": draw(st.integers(0, 2**16))}  # fmt: skip
    tags += [f"ctx={ctx}", f"past_len={past_len}"]
    return Case("retain-kv-cache", b.model(), lambda: RetainKvCache(ctx_len=ctx), tuple(tags), kv=kv)
