"""fuse-rotary: rotate-half RoPE with cos/sin computed from position_ids, in the exporters' spellings, perturbed."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzz.builder import DTYPE_NAMES, F16, F32, I64, NP, Builder, Case, binary, perturbation, to_custom_domain, vector

POSITIONS = 8
INT64_MAX = np.iinfo(np.int64).max
PERTURBATIONS = ["uneven_halves", "halves_swapped", "other_x", "extra_consumer", "full_width_freqs", "custom_domain_node"]


def _cos_sin(draw: Any, b: Builder, pos: str, half: int, dtype: int, tags: list[str]) -> tuple[str, str]:
    """cos and sin [B, 1, S, 2 * half] from ``pos`` [B, S]: dynamo's Mul by inv_freq, or Optimum's MatMul with an Expand."""
    inv = vector(draw, 2 * half if "full_width_freqs" in tags else half, np.float32, 0.001, 1.0)
    if draw(st.booleans()):
        tags.append("freqs=mul")
        p = b.op("Cast", [b.unsqueeze(pos, [-1])], to=F32)
        freqs = binary(b, draw, "Mul", p, b.const(inv, np.float32))
    else:
        tags.append("freqs=matmul")  # inv_freq[None, :, None] @ pos[:, None, :], transposed (Optimum, TorchScript)
        p = b.op("Cast", [b.unsqueeze(pos, [1])], to=F32)
        shape = b.op("Shape", [pos], start=0, end=1)
        target = b.op("Concat", [shape, b.const([len(inv), 1], np.int64)], axis=0)
        col = b.op("Expand", [b.const(inv.reshape(1, -1, 1), np.float32), target])
        freqs = b.op("Transpose", [b.op("MatMul", [col, p])], perm=[0, 2, 1])
    emb = freqs if "full_width_freqs" in tags else b.op("Concat", [freqs, freqs], axis=-1)
    out = []
    for op in ("Cos", "Sin"):
        t = b.op(op, [emb])
        if draw(st.booleans()):
            t = binary(b, draw, "Mul", t, b.const(draw(st.sampled_from([1.0, 0.5, 1.2])), np.float32))  # attention scaling
        if dtype != F32:
            t = b.op("Cast", [t], to=dtype)
        out.append(b.unsqueeze(t, [1]))
    return out[0], out[1]


def _slice(draw: Any, b: Builder, x: str, start: int, end: int) -> str:
    ins = [x, b.const([start], np.int64), b.const([end], np.int64), b.const([draw(st.sampled_from([-1, 3]))], np.int64)]
    if draw(st.booleans()):
        ins.append(b.const([1], np.int64))
    return b.op("Slice", ins)


@st.composite
def rotary_cases(draw: Any) -> Case:
    """``x * cos + rotate_half(x) * sin`` on [B, N, S, D] (maybe the head split of [B, S, N * D])."""
    from passes import FuseRotary

    opset = draw(st.sampled_from([17, 18, 20, 23]))
    dtype = draw(st.sampled_from([F32, F32, F16]))
    tags = [f"opset={opset}", f"dtype={DTYPE_NAMES[dtype]}", perturbation(draw, PERTURBATIONS)]
    b = Builder(opset, const_nodes=draw(st.booleans()))
    b.value_info = draw(st.booleans())
    batch, heads, seq, half = (draw(st.integers(1, n)) for n in (2, 3, 4, 4))
    dim = 2 * half
    pos = b.input("position_ids", I64, [batch, seq])
    first = len(b.nodes)
    if draw(st.booleans()):
        tags.append("head_split")
        q = b.input("q", dtype, [batch, seq, heads * dim])
        x = b.op("Transpose", [b.op("Reshape", [q, b.const([batch, seq, heads, dim], np.int64)])], perm=[0, 2, 1, 3])
    else:
        x = b.input("x", dtype, [batch, heads, seq, dim])
    cos, sin = _cos_sin(draw, b, pos, half, dtype, tags)
    cut = half - 1 if "uneven_halves" in tags and half > 1 else half
    lower = _slice(draw, b, x, 0, cut)
    upper = _slice(draw, b, x, cut, draw(st.sampled_from([dim, INT64_MAX])))
    parts = [lower, b.op("Neg", [upper])] if "halves_swapped" in tags else [b.op("Neg", [upper]), lower]
    rot = b.op("Concat", parts, axis=draw(st.sampled_from([-1, 3])))
    other = b.op("Relu", [x]) if "other_x" in tags else x
    y = binary(b, draw, "Add", binary(b, draw, "Mul", other, cos), binary(b, draw, "Mul", rot, sin))
    custom = to_custom_domain(draw, b, first, y, tags) if "custom_domain_node" in tags else None
    b.output(y, dtype, [batch, heads, seq, dim] if custom else None)
    if "extra_consumer" in tags:
        b.output(b.op("Identity", [rot]), dtype)
    rng = np.random.default_rng(draw(st.integers(0, 99)))
    feeds = {"position_ids": rng.integers(0, POSITIONS, (batch, seq))}
    for v in b.inputs[1:]:  # x or q, in its dtype (the check draws float32 for the inputs it is not given)
        feeds[v.name] = rng.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]).astype(NP[dtype])
    fp16 = dtype == F16
    return Case("fuse-rotary", b.model(), lambda: FuseRotary(positions=POSITIONS), tuple(tags), atol=2e-2 if fp16 else 1e-4,
                rtol=2e-2 if fp16 else 1e-3, feeds=feeds, custom_node=custom)  # fmt: skip
