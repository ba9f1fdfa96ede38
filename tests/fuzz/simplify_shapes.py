"""simplify-shapes: chains of layout ops on static shapes, and linear layers in 2-D row regions."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from onnx import helper

from fuzz.builder import F32, Builder, Case, binary, chance, to_custom_domain


@st.composite
def simplify_shapes_cases(draw: Any) -> Case:
    """Chains of Reshape, Transpose, GatherElements, Expand and Identity on static shapes, some trivial, some not."""
    from passes import SimplifyShapes

    if draw(st.booleans()):
        return draw(row_region_cases())
    b = Builder(draw(st.sampled_from([13, 17, 18])), const_nodes=draw(st.booleans()))
    b.value_info = draw(st.booleans())
    rank = draw(st.integers(2, 4))
    shape = [draw(st.sampled_from([1, 1, 2, 3])) for _ in range(rank)]
    cur = b.input("x", F32, list(shape))
    tags = [f"shape={shape}"]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    first = len(b.nodes)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["Reshape", "Transpose", "GatherElements", "GatherLine", "Expand", "Identity", "Relu"]))
        tags.append(op)
        if op == "Reshape":
            new = list(draw(st.permutations(shape))) if draw(st.booleans()) else [*shape, 1] if len(shape) < 5 else shape
            cur = b.op("Reshape", [cur, b.const(new, np.int64)])
            shape = new
        elif op == "Transpose":
            perm = list(draw(st.permutations(range(len(shape)))))
            cur = b.op("Transpose", [cur], perm=perm)
            shape = [shape[p] for p in perm]
        elif op == "GatherElements":
            axis = draw(st.integers(-len(shape), len(shape) - 1))
            idx = rng.integers(-shape[axis], shape[axis], shape).astype(np.int64)  # valid indices, negative ones too
            cur = b.op("GatherElements", [cur, b.const(idx, np.int64)], axis=axis)
        elif op == "GatherLine":  # indices broadcast from a line along the axis (a Gather), or from more (not one)
            axis = draw(st.integers(-len(shape), len(shape) - 1))
            ax = axis % len(shape)
            n = draw(st.integers(1, 3))
            lshape = [1] * len(shape)
            lshape[ax] = n
            others = [j for j in range(len(shape)) if j != ax and shape[j] > 1]
            if others and chance(draw, 3):
                j = draw(st.sampled_from(others))
                lshape[j] = shape[j]
                tags.append("not-a-line")
            line = rng.integers(-shape[ax], shape[ax], lshape).astype(np.int64)
            target = list(shape)
            target[ax] = n
            cur = b.op("GatherElements", [cur, b.op("Expand", [b.const(line, np.int64), b.const(target, np.int64)])], axis=axis)
            shape = target
        elif op == "Expand":
            target = [d if draw(st.booleans()) or d != 1 else 2 for d in shape]
            cur = b.op("Expand", [cur, b.const(target, np.int64)])
            shape = target
        else:
            cur = b.op(op, [cur])
    b.output(cur, F32, list(shape))
    custom = to_custom_domain(draw, b, first, cur, tags) if chance(draw, 1) else None
    return Case("simplify-shapes", b.model(), SimplifyShapes, tuple(tags), custom_node=custom)


@st.composite
def row_region_cases(draw: Any) -> Case:
    """Linear layers written as Reshape, Gemm/MatMul, Reshape, with row-wise and other ops between (simplify-shapes' 2-D regions)."""
    from passes import SimplifyShapes

    b = Builder(draw(st.sampled_from([17, 18])), const_nodes=draw(st.booleans()))
    b.value_info = draw(st.booleans())
    lead = draw(st.sampled_from([[1, 1], [2, 1], [1, 3], [2, 3], [1, 1, 2]]))
    rows = int(np.prod(lead))
    k = draw(st.sampled_from([2, 4, 6]))
    cur = b.input("x", F32, [*lead, k])
    tags = [f"lead={lead}"]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    seen = {k: [cur]}  # tensors of shape [*lead, k], by k: residual operands

    def weights(*shape: int) -> str:
        return b.const((rng.standard_normal(shape) * 0.5).astype(np.float32), np.float32)

    first = len(b.nodes)
    for _ in range(draw(st.integers(1, 7))):
        op = draw(st.sampled_from(["linear", "linear", "Relu", "LayerNormalization", "norm_axis1", "Mul", "Add", "split", "Softmax"]))
        tags.append(op)
        if op == "linear":
            n = draw(st.sampled_from([2, 4, 6]))
            flat = b.op("Reshape", [cur, b.const([rows, k], np.int64)])
            if draw(st.booleans()):
                y = b.op("Gemm", [flat, weights(k, n), weights(n)])
            else:
                y = b.op("MatMul", [flat, weights(k, n)])
            cur, k = b.op("Reshape", [y, b.const([*lead, n] if draw(st.booleans()) else [*lead[:-1], -1, n], np.int64)]), n
        elif op == "Relu":
            cur = b.op("Relu", [cur])
        elif op == "LayerNormalization":
            axis = draw(st.sampled_from([-1, len(lead)]))
            cur = b.op("LayerNormalization", [cur, weights(k), weights(k)], axis=axis)
        elif op == "norm_axis1":  # over the trailing axes from 1: not row-wise
            shape = [*lead, k][1:]
            cur = b.op("LayerNormalization", [cur, weights(*shape), weights(*shape)], axis=1)
        elif op == "Mul":  # a row-broadcast operand of rank 1, 2 or 3 (rank 3 keeps the leading axes)
            cur = binary(b, draw, "Mul", cur, weights(*draw(st.sampled_from([[k], [1, k], [1, 1, k]]))))
        elif op == "Add":  # a residual of the same shape, or a row vector
            other = draw(st.sampled_from(seen.get(k, []) + [weights(k)]))
            cur = binary(b, draw, "Add", cur, other)
        elif op == "split" and k % 2 == 0:
            h1, h2 = b.fresh(), b.fresh()
            axis = draw(st.sampled_from([-1, len(lead)]))
            b.nodes.append(helper.make_node("Split", [cur, b.const([k // 2, k // 2], np.int64)], [h1, h2], name=b.fresh("n"), axis=axis))
            cur, k = b.op("Mul", [h1, h2]), k // 2
        elif op == "Softmax":
            cur = b.op("Softmax", [cur], axis=-1)
        seen.setdefault(k, []).append(cur)
    b.output(cur, F32, [*lead, k])
    custom = to_custom_domain(draw, b, first, cur, tags) if chance(draw, 1) else None
    return Case("simplify-shapes", b.model(), SimplifyShapes, tuple(tags), atol=1e-4, rtol=1e-3, custom_node=custom)
