"""fold-constants: constant-foldable shape math and constant arithmetic around a dynamic input."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzz.builder import F32, I64, Builder, Case, binary
from fuzz.shape_math import shape_gadgets


def _const_arith(draw: Any, b: Builder, x: str, width: int, tags: list[str]) -> None:
    """A chain of arithmetic on small constants (int64 and float32), then added to x."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    ints = [b.const(rng.integers(-5, 6, width), np.int64)]
    floats = [b.const(rng.uniform(-2, 2, width).astype(np.float32), np.float32)]
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["Add", "Sub", "Mul", "Div", "Neg", "Abs", "Cast_if", "Cast_fi", "Max", "Min", "Where", "Concat_Slice",
                                   "Unsqueeze_Squeeze", "Transpose"]))  # fmt: skip
        tags.append(op)
        a_i, a_f = draw(st.sampled_from(ints)), draw(st.sampled_from(floats))
        if op in ("Add", "Sub", "Mul", "Max", "Min"):
            if draw(st.booleans()):
                ints.append(b.op(op, [a_i, draw(st.sampled_from(ints))]))
            else:
                floats.append(b.op(op, [a_f, draw(st.sampled_from(floats))]))
        elif op == "Div":  # by a fresh constant that is never 0
            if draw(st.booleans()):
                ints.append(b.op("Div", [a_i, b.const(rng.choice([-3, -2, -1, 1, 2, 3], width), np.int64)]))
            else:
                floats.append(b.op("Div", [a_f, b.const(rng.choice([-2.0, -0.5, 0.5, 4.0], width).astype(np.float32), np.float32)]))
        elif op in ("Neg", "Abs"):
            floats.append(b.op(op, [a_f]))
        elif op == "Cast_if":
            floats.append(b.op("Cast", [a_i], to=F32))
        elif op == "Cast_fi":
            ints.append(b.op("Cast", [a_f], to=I64))
        elif op == "Where":
            floats.append(b.op("Where", [b.op("Less", [a_i, b.const(0, np.int64)]), a_f, draw(st.sampled_from(floats))]))
        elif op == "Concat_Slice":
            cat = b.op("Concat", [a_f, draw(st.sampled_from(floats))], axis=0)
            floats.append(b.op("Slice", [cat, b.const([1], np.int64), b.const([width + 1], np.int64)]))
        elif op == "Unsqueeze_Squeeze":
            floats.append(b.op("Squeeze", [b.unsqueeze(a_f, [0]), b.const([0], np.int64)] if b.opset >= 13 else [b.unsqueeze(a_f, [0])],
                               **({} if b.opset >= 13 else {"axes": [0]})))  # fmt: skip
        else:
            floats.append(b.op("Transpose", [b.unsqueeze(a_f, [1])], perm=[1, 0]))
            floats[-1] = b.op("Reshape", [floats[-1], b.const([width], np.int64)])
    total = b.op("Add", [b.op("Cast", [ints[-1]], to=F32), floats[-1]])
    b.output(binary(b, draw, "Add", x, total), F32)


@st.composite
def fold_constants_cases(draw: Any) -> Case:
    """Constant-foldable shape math and constant arithmetic, around a dynamic input."""
    from passes import FoldConstants

    opset = draw(st.sampled_from([13, 14, 17, 18]))
    tags = [f"opset={opset}"]
    b = Builder(opset, const_nodes=draw(st.booleans()))
    width = draw(st.integers(1, 5))
    shape: list[int | str] = [draw(st.sampled_from([2, "batch"])), draw(st.sampled_from([3, "seq_len"])), width]
    x = b.input("x", F32, shape)
    mask = b.input("mask", I64, [shape[0], "total_len"]) if draw(st.booleans()) else None
    if draw(st.booleans()):
        shape_gadgets(draw, b, x, shape, mask, tags)
    else:
        _const_arith(draw, b, x, width, tags)
    dims = {"batch": draw(st.integers(1, 3)), "seq_len": draw(st.integers(1, 4)), "total_len": draw(st.integers(1, 6))}
    return Case("fold-constants", b.model(), FoldConstants, tuple(tags), dims=dims, idempotent=False)
