"""fold-identities: retain-kv-cache's last-position selection and padding redirect at one or more tokens per row,
spelled several ways and perturbed, with unit reductions, self-comparisons and reshape chains around them."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzz.builder import BOOL, F32, I64, Builder, Case, chance, perturbation


@st.composite
def fold_identities_cases(draw: Any) -> Case:
    from passes import FoldIdentities

    b = Builder(draw(st.sampled_from([13, 17, 18])), const_nodes=draw(st.booleans()))
    b.value_info = draw(st.booleans())
    bad = perturbation(draw, ["float_compare", "other_tensor", "twos", "column", "keepdims0", "transpose"])
    bsz, seq, width = draw(st.integers(1, 3)), draw(st.sampled_from([1, 1, 2, 3])), draw(st.sampled_from([1, 4]))
    tags = [f"B={bsz} S={seq} W={width}", f"bad={bad}"]
    pos = b.input("position_ids", I64, [bsz, seq])
    hidden = b.input("hidden", F32, [bsz, seq, width])
    reduce = draw(st.sampled_from(["ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceProd"]))
    keep = 0 if bad == "keepdims0" else 1
    axes = b.const([1], np.int64)
    last = b.op(reduce, [pos, axes], keepdims=keep) if b.opset >= 18 or reduce == "ReduceSum" and b.opset >= 13 else \
        b.op(reduce, [pos], axes=[1], keepdims=keep)  # fmt: skip
    if keep == 0:
        last = b.unsqueeze(last, [1])
    other = b.op("Abs", [pos]) if bad == "other_tensor" else last
    cmp = draw(st.sampled_from(["Equal", "LessOrEqual", "GreaterOrEqual", "Less", "Greater"]))
    tags += [reduce, cmp]
    if bad == "float_compare":
        f = b.op("Cast", [pos], to=F32)
        onehot = b.op("Cast", [b.op(cmp, [f, f])], to=F32)
    else:
        onehot = b.op("Cast", [b.op(cmp, [pos, other])], to=F32)
    sel = b.unsqueeze(onehot, [1])  # [B, 1, S]
    if bad in ("twos", "column"):
        shape = [bsz, 2 if bad == "column" else 1, seq]
        sel = b.const(np.full(shape, 2.0 if bad == "twos" else 1.0, np.float32), np.float32)
    b.output(b.op("Relu", [b.op("MatMul", [sel, hidden])]), F32)
    if width == 1 and chance(draw, 5):  # the ones on the right
        b.output(b.op("Neg", [b.op("MatMul", [hidden, b.const(np.ones((1, 1), np.float32), np.float32)])]), F32)
        tags.append("ones_right")
    zero = b.const(np.int64(0), np.int64)
    valid = b.op("GreaterOrEqual", [pos, zero])
    target = b.op("Where", [valid, pos, last])
    target = b.op("Where", [b.op("Less", [target, zero]), b.const(np.int64(7), np.int64), target])
    if bad == "transpose":
        wide = b.op("Transpose", [target], perm=[1, 0])
    else:
        wide = b.unsqueeze(target, [2]) if chance(draw, 5) else target
    b.output(b.op("Reshape", [wide, b.const([bsz * seq], np.int64)]), I64)
    if chance(draw, 3):  # a self-comparison as a graph output: folded? no, an output is kept
        b.output(b.op("Equal", [pos, pos]), BOOL)
        tags.append("output_compare")
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    feeds = {"position_ids": rng.integers(-1, 8, (bsz, seq)).astype(np.int64)}
    return Case("fold-identities", b.model(), FoldIdentities, tuple(tags), feeds=feeds)
