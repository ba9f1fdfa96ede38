"""fuse-decode-attention: attention over a retained cache, as retain-kv-cache and fuse-attention leave it, perturbed."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from onnx import helper

from fuzz.builder import F32, I64, Builder, Case, perturbation


@st.composite
def decode_attention_cases(draw: Any) -> Case:
    """Attention over a retained cache, as retain-kv-cache and fuse-attention leave it, with near misses.

    One token (decode), or a chunk of S tokens in one row (prefill) whose feeds
    hold consecutive positions from a multiple of S, as the runtime feeds them:
    the rewrite's contract at prefill (the pass cannot see positions). A chunk
    in two rows, or a cache that is not a whole number of chunks, is declined.
    """
    from passes import FuseDecodeAttention

    opset = draw(st.sampled_from([17, 18]))
    b = Builder(opset, const_nodes=draw(st.booleans()))
    b.domains["com.microsoft"] = 1
    bad = perturbation(draw, ["shifted_mask", "other_indices", "past_reader", "head4", "slot_unproven", "two_tokens", "repeat_read"])
    bsz, heads, ctx = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3, 4])), draw(st.integers(4, 9))
    # Grouped KV heads: the cache holds kv heads, repeated for the attention (Unsqueeze, Expand, Reshape).
    kv = draw(st.sampled_from([k for k in (1, 2, heads) if heads % k == 0]))
    if bad == "repeat_read" and kv == heads:
        kv = 1 if heads > 1 else kv
        heads = heads if heads > 1 else 2
    h = 4 if bad == "head4" else draw(st.sampled_from([8, 16]))
    s_len = 2 if bad == "two_tokens" else 1
    if bad == "two_tokens" and bsz == 1 and ctx % 2 == 0:
        ctx += 1  # one row would be a chunk: declined for two rows or a cache of an odd number of slots
    chunk = bad != "two_tokens" and draw(st.booleans())
    if chunk:  # one row, a cache of whole chunks
        s_len = draw(st.sampled_from([2, 4]))
        bsz, ctx = 1, s_len * draw(st.integers(1, 3))
    d = heads * h
    tags = [f"B={bsz} N={heads} KV={kv} H={h} C={ctx} S={s_len}", f"bad={bad}"]
    per_head = draw(st.booleans())  # keys changed after the head split (a rotary embedding's place)
    tags += ["per-head-keys"] if per_head else []
    pos = b.input("position_ids", I64, [bsz, s_len])
    zero = b.const(np.int64(0), np.int64)
    # mask[b, 0, q, j] = 0 if j <= pos[b, q] else -10000
    shown_pos = b.op("Add", [pos, b.const(np.int64(1), np.int64)]) if bad == "shifted_mask" else pos
    visible = b.op("LessOrEqual", [b.const(np.arange(ctx).reshape(1, 1, 1, ctx), np.int64), b.unsqueeze(shown_pos, [1, 3])])
    mask = b.op("Where", [visible, b.const(np.float32(0), np.float32), b.const(np.float32(-10000), np.float32)])
    # The slot written: the position itself, or retain-kv-cache's padding chain around it.
    spelling = "unproven" if bad == "slot_unproven" else draw(st.sampled_from(["plain", "chain"]))
    tags.append(f"slot={spelling}")
    if spelling == "chain":
        axes = b.const([1], np.int64)
        maxpos = b.op("ReduceMax", [pos, axes], keepdims=1) if opset >= 18 else b.op("ReduceMax", [pos], axes=[1], keepdims=1)
        target = b.op("Where", [b.op("GreaterOrEqual", [pos, zero]), pos, maxpos])
        slot = b.op("Where", [b.op("Less", [target, zero]), b.const(np.int64(ctx - 1), np.int64), target])
    elif spelling == "unproven":  # equal to the position only by the feeds' luck
        slot = b.op("Max", [pos, zero])
    else:
        slot = pos
    slot4 = b.unsqueeze(slot, [1, 3])
    if kv > 1 or s_len > 1 or draw(st.booleans()):
        slot4 = b.op("Expand", [slot4, b.const([bsz, kv, s_len, 1], np.int64)])
    grids = np.meshgrid(np.arange(bsz), np.arange(kv), np.zeros(s_len, np.int64), indexing="ij")
    parts = [b.const(g[..., None].astype(np.int64), np.int64) for g in grids[:2]]
    indices = b.op("Concat", [*parts, slot4], axis=-1)
    value_indices = b.op("Concat", [*parts, slot4], axis=-1) if bad == "other_indices" else indices
    # q, k, v: one packed projection split three ways, or three inputs.
    if kv == heads and draw(st.booleans()):
        qkv = b.input("qkv", F32, [bsz, s_len, 3 * d])
        if opset >= 18:
            q, k, v = (b.fresh() for _ in range(3))
            b.nodes.append(helper.make_node("Split", [qkv], [q, k, v], name=b.fresh("n"), axis=-1, num_outputs=3))
        else:
            q, k, v = (b.fresh() for _ in range(3))
            b.nodes.append(helper.make_node("Split", [qkv, b.const([d, d, d], np.int64)], [q, k, v], name=b.fresh("n"), axis=2))
        tags.append("packed")
    else:
        q = b.input("q", F32, [bsz, s_len, d])
        k, v = (b.input(n, F32, [bsz, s_len, kv * h]) for n in ("k", "v"))
    outs = {}
    copy = None
    if chunk and draw(st.booleans()):  # retain-kv-cache's padding copy: each padding token takes the last valid one's values
        steps = b.const(np.arange(s_len).reshape(1, s_len), np.int64)
        last = b.op("ArgMax", [pos], axis=1, keepdims=1)
        copy = b.op("Reshape", [b.op("Where", [b.op("GreaterOrEqual", [pos, zero]), steps, last]), b.const([s_len], np.int64)])
        tags.append("padding-copy")
    for role, x, idx in (("key", k, indices), ("value", v, value_indices)):
        if s_len > 1:  # the head split of several tokens moves elements
            x4 = b.op("Transpose", [b.op("Reshape", [x, b.const([bsz, s_len, kv, h], np.int64)])], perm=[0, 2, 1, 3])
            if role == "key" and per_head:
                x4 = b.op("Mul", [x4, b.const(np.linspace(-1.5, 1.5, h).astype(np.float32), np.float32)])
            if copy is not None:
                x4 = b.op("Gather", [x4, copy], axis=2)
        elif kv == 1 and draw(st.booleans()):
            x4 = b.unsqueeze(x, [1])
        else:
            x4 = b.op("Reshape", [x, b.const([bsz, kv, 1, h], np.int64)])
        if s_len == 1 and role == "key" and per_head:
            x4 = b.op("Mul", [x4, b.const(np.linspace(-1.5, 1.5, h).astype(np.float32), np.float32)])
        past = b.input(f"past_{role}.0", F32, [bsz, kv, ctx, h])
        if role == "key" and bad == "past_reader":
            b.output(b.op("ReduceSum", [past], keepdims=0), F32, [])
        outs[role] = b.op("ScatterND", [past, idx, x4], out=f"past_{role}.0_RetainedState")
        b.output(outs[role], F32, [bsz, kv, ctx, h])
    for role in ("key", "value") if kv < heads else ():  # query head j reads KV head j // (heads / kv)
        wide = b.op("Expand", [b.unsqueeze(outs[role], [2]), b.const([bsz, kv, heads // kv, ctx, h], np.int64)])
        outs[role] = b.op("Reshape", [wide, b.const([bsz, heads, ctx, h], np.int64)])
        if role == "key" and bad == "repeat_read":
            b.output(b.op("Identity", [wide]), F32, [bsz, kv, heads // kv, ctx, h])
    attrs = {"num_heads": heads} | ({"scale": float(draw(st.sampled_from([0.5, 1 / np.sqrt(h)])))} if draw(st.booleans()) else {})
    y = b.fresh()
    b.nodes.append(helper.make_node("MultiHeadAttention", [q, outs["key"], outs["value"], "", "", mask], [y], name=b.fresh("n"),
                                    domain="com.microsoft", **attrs))  # fmt: skip
    b.output(y, F32, [bsz, s_len, d])
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    positions = rng.integers(0, ctx - 1, (bsz, s_len)) if bad == "shifted_mask" else rng.integers(0, ctx, (bsz, s_len))
    if s_len > 1:
        positions = np.sort(positions, axis=1)
    if chunk:  # the runtime's chunks: consecutive positions from a multiple of S
        positions = (s_len * rng.integers(0, ctx // s_len) + np.arange(s_len)).reshape(1, s_len)
        if bad == "shifted_mask":  # the shifted mask must not reach past the cache
            positions = np.minimum(positions, ctx - 2)
    return Case("fuse-decode-attention", b.model(), FuseDecodeAttention, tuple(tags), atol=1e-4, rtol=1e-3,
                feeds={"position_ids": positions.astype(np.int64)}, shared_state=True)  # fmt: skip
