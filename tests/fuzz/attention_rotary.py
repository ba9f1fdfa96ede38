"""fuse-attention-rotary: a decode step's or a prompt chunk's rotated q and k packed for GroupQueryAttention, as
fuse-rotary and fuse-decode-attention leave it, perturbed."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from onnx import helper

from fuzz.builder import F32, I64, Builder, Case, perturbation


@st.composite
def attention_rotary_cases(draw: Any) -> Case:
    """One token per row, or a chunk of 2 to 4 tokens in one row, over a retained cache. Decode: valid positions only
    (a padding row's own output changes by design); a chunk: consecutive positions, right-padded with -1 when the
    rotary reads Max(p, 0) (a chunk's outputs do not change at all)."""
    from passes import FuseAttentionRotary

    b = Builder(23, const_nodes=draw(st.booleans()))
    b.domains["com.microsoft"] = 1
    bad = perturbation(draw, ["partial", "interleaved", "other_positions", "slot_unproven", "rotated_read", "head8", "chunk_rows"])
    bsz, heads, ctx = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4])), draw(st.integers(4, 9))
    kv = draw(st.sampled_from([k for k in (1, 2, heads) if heads % k == 0]))
    h = 8 if bad == "head8" else draw(st.sampled_from([16, 32]))
    s_len = 2 if bad == "chunk_rows" else draw(st.sampled_from([1, 1, 2, 4]))
    if s_len > 1:
        bsz, ctx = 2 if bad == "chunk_rows" else 1, s_len * draw(st.integers(2, 4))
    tags = [f"B={bsz} N={heads} KV={kv} H={h} C={ctx} S={s_len}", f"bad={bad}"]
    pos = b.input("position_ids", I64, [bsz, s_len])
    zero = b.const(np.int64(0), np.int64)
    # The slot GroupQueryAttention writes (seqlens_k): the position, or retain-kv-cache's padding chain around it.
    spelling = "unproven" if bad == "slot_unproven" else draw(st.sampled_from(["plain", "chain"]))
    tags.append(f"slot={spelling}")
    if spelling == "chain":
        target = b.op("Where", [b.op("GreaterOrEqual", [pos, zero]), pos, b.op("ReduceMax", [pos, b.const([1], np.int64)], keepdims=1)])
        slot = b.op("Where", [b.op("Less", [target, zero]), b.const(np.int64(ctx - 1), np.int64), target])
    elif spelling == "unproven":  # equal to the position only by the feeds' luck
        slot = b.op("Abs", [pos])
    else:
        slot = pos
    if s_len > 1:  # a chunk: its last slot
        slot = b.op("Add", [b.op("Gather", [slot, b.const([0], np.int64)], axis=1), b.const([s_len - 1], np.int64)])
    seqlens = b.op("Cast", [b.op("Reshape", [slot, b.const([bsz], np.int64)])], to=6)
    # The rotary's positions: fuse-rotary's Max(p, 0), or p itself.
    clamped = draw(st.booleans())
    rot_pos = b.op("Max", [pos, zero]) if clamped else pos
    k_pos = b.op("Max", [b.input("other_positions", I64, [bsz, s_len]), zero]) if bad == "other_positions" else rot_pos
    rot = 4 if bad == "partial" else h  # the rotated channels
    angles = np.arange(ctx)[:, None] * draw(st.sampled_from([10000.0, 500.0])) ** (-np.arange(0, rot, 2) / rot)[None]
    cos, sin = b.const(np.cos(angles).astype(np.float32), np.float32), b.const(np.sin(angles).astype(np.float32), np.float32)
    widths = [heads * h, kv * h, kv * h]
    if draw(st.booleans()):
        qkv = b.input("qkv", F32, [bsz, s_len, sum(widths)])
        q, k, v = (b.fresh() for _ in range(3))
        b.nodes.append(helper.make_node("Split", [qkv, b.const(widths, np.int64)], [q, k, v], name=b.fresh("n"), axis=-1))
        tags.append("packed")
    else:
        q, k, v = (b.input(n, F32, [bsz, s_len, w]) for n, w in zip("qkv", widths))
    rotated = []
    for role, x, n, p in (("q", q, heads, rot_pos), ("k", k, kv, k_pos)):
        attrs = {"num_heads": n, "interleaved": int(bad == "interleaved" and role == "k")}
        if bad == "partial":
            attrs["rotary_embedding_dim"] = rot
        rotated.append(b.op("RotaryEmbedding", [x, cos, sin, p], **attrs))
    if bad == "rotated_read":
        b.output(b.op("Identity", [rotated[0]]), F32, [bsz, s_len, heads * h])
    packed = b.op("Concat", [*rotated, v], axis=-1)
    outs = [b.fresh(), "past_key.0_RetainedState", "past_value.0_RetainedState"]
    pasts = [b.input(f"past_{r}.0", F32, [bsz, kv, ctx, h]) for r in ("key", "value")]
    attrs = {"num_heads": heads, "kv_num_heads": kv} | ({"scale": 0.5} if draw(st.booleans()) else {})
    total = b.const(np.int32(ctx), np.int32)
    b.nodes.append(helper.make_node("GroupQueryAttention", [packed, "", "", *pasts, seqlens, total], outs, name=b.fresh("n"),
                                    domain="com.microsoft", **attrs))  # fmt: skip
    b.output(outs[0], F32, [bsz, s_len, heads * h])
    for o in outs[1:]:
        b.output(o, F32, [bsz, kv, ctx, h])
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if s_len == 1:
        positions = rng.integers(0, ctx, (bsz, 1))
    else:  # the runtime's chunks: from a multiple of S, consecutive, then padding
        positions = s_len * rng.integers(0, ctx // s_len, (bsz, 1)) + np.arange(s_len)
        if clamped and draw(st.booleans()):
            positions[:, rng.integers(1, s_len) :] = -1
            tags.append("right-padded")
    feeds = {"position_ids": positions.astype(np.int64)}
    if bad == "other_positions":
        feeds["other_positions"] = rng.integers(0, ctx, (bsz, s_len)).astype(np.int64)
    return Case("fuse-attention-rotary", b.model(), FuseAttentionRotary, tuple(tags), atol=1e-4, rtol=1e-3, feeds=feeds,
                shared_state="both")  # fmt: skip
