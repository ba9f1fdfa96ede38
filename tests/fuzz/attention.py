"""fuse-attention: Softmax(Q K^T * s + bias) V in the dynamo and TorchScript spellings, perturbed."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzz.builder import F32, Builder, Case, binary, chance, perturbation, to_custom_domain


@st.composite
def attention_cases(draw: Any) -> Case:
    """Softmax(Q K^T * s + bias) V in the dynamo and TorchScript spellings, perturbed or not."""
    from passes import FuseAttention

    b = Builder(draw(st.sampled_from([14, 17, 18])), const_nodes=draw(st.booleans()))
    b.value_info = draw(st.booleans())
    bsz, heads, s_len, h = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    length = draw(st.integers(1, 4))
    bad = perturbation(draw, ["softmax_axis", "key_perm", "bias_rows", "scale_tensor", "probs_output", "v_heads"])
    tags = [f"B={bsz} N={heads} S={s_len} L={length} H={h}", f"bad={bad}"]
    split_heads = draw(st.booleans())
    if split_heads:  # dynamo/HF: the query arrives as [B, S, N*H] and is split into heads
        q_in = b.input("q_in", F32, [bsz, s_len, heads * h])
        q = b.op("Transpose", [b.op("Reshape", [q_in, b.const([bsz, s_len, heads, h], np.int64)])], perm=[0, 2, 1, 3])
    else:
        q = b.input("q", F32, [bsz, heads, s_len, h])
    k = b.input("k", F32, [bsz, heads, length, h])
    v_heads = 2 if bad == "v_heads" and heads == 1 else heads  # V broadcasts over Q's single head
    v = b.input("v", F32, [bsz, v_heads, length, h])
    first = len(b.nodes)
    scale = float(draw(st.sampled_from([1.0, 0.5, 1 / np.sqrt(h)])))
    spelling = draw(st.sampled_from(["transpose", "dynamo"]))
    tags.append(spelling)
    if spelling == "dynamo":
        kt = b.op("Transpose", [b.op("Reshape", [k, b.const([bsz * heads, length, h], np.int64)])], perm=[0, 2, 1])
        kt = b.op("Reshape", [kt, b.const([bsz, heads, h, length], np.int64)])
        root = float(np.sqrt(scale))
        q = binary(b, draw, "Mul", q, b.const(np.float32(root), np.float32))
        kt = binary(b, draw, "Mul", kt, b.const(np.float32(root), np.float32))
        scores = b.op("MatMul", [q, kt])
    else:
        kt = b.op("Transpose", [k], perm=[1, 0, 3, 2] if bad == "key_perm" and bsz == heads else [0, 1, 3, 2])
        scores = b.op("MatMul", [q, kt])
        if bad == "scale_tensor":  # a per-position factor is not a scale
            scores = b.op("Mul", [scores, b.const(np.linspace(0.5, 1.0, length, dtype=np.float32), np.float32)])
        elif draw(st.booleans()):
            scores = b.op("Div", [scores, b.const(np.float32(1 / scale), np.float32)])
        else:
            scores = binary(b, draw, "Mul", scores, b.const(np.float32(scale), np.float32))
    if draw(st.booleans()) or bad == "bias_rows":
        rows = 1 if bad == "bias_rows" else s_len
        lead = [draw(st.sampled_from([1, bsz])), draw(st.sampled_from([1, heads]))][draw(st.integers(0, 2)) :]
        bias = b.input("bias", F32, [*lead, rows, length])
        tags.append(f"bias={[*lead, rows, length]}")
        scores = binary(b, draw, "Add", scores, bias)
    probs = b.op("Softmax", [scores], axis=2 if bad == "softmax_axis" else draw(st.sampled_from([-1, 3])))
    y = b.op("MatMul", [probs, v])
    out_heads = max(heads, v_heads)
    y_shape = [bsz, out_heads, s_len, h]
    if split_heads and draw(st.booleans()):  # merge the heads again, to 3-D or 2-D
        y_shape = [bsz, s_len, out_heads * h] if draw(st.booleans()) else [bsz * s_len, out_heads * h]
        y = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.const(y_shape, np.int64)])
    b.output(y, F32, y_shape)  # declared: a custom-domain node below hides it from inference
    if bad == "probs_output":
        b.output(probs, F32, [bsz, heads, s_len, length])
    custom = to_custom_domain(draw, b, first, y, tags) if chance(draw, 1) else None
    return Case("fuse-attention", b.model(), FuseAttention, tuple(tags), atol=1e-4, rtol=1e-3, custom_node=custom)
