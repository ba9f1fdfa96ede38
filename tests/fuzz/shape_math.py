"""Exporter-style shape arithmetic that fold-constants and pin-static-shapes must fold."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from onnx import numpy_helper

from fuzz.builder import F32, I64, Builder, binary, chance, vector


def shape_gadgets(draw: Any, b: Builder, x: str, shape: list[int | str], mask: str | None, tags: list[str]) -> None:
    """One to three pieces of exporter-style shape arithmetic on ``x`` [d0, d1, W] (and ``mask``), each an output."""
    W = int(shape[-1])  # noqa: N806
    zero, one = b.const([0], np.int64), b.const([1], np.int64)
    full = b.op("Shape", [x])
    for _ in range(draw(st.integers(1, 3))):
        gadget = draw(st.sampled_from(["flatten", "merge_leading", "reshape_minus_one", "size", "gather_scalar_arith",
                                       "slice_shape", "mask_len", "expand", "const_of_shape", "range"]))  # fmt: skip
        tags.append(gadget)
        if gadget == "flatten":  # [d0, d1*W] from Shape(start=1) and ReduceProd
            inner = b.op("Shape", [x], start=1) if b.opset >= 15 else b.op("Slice", [full, one, b.const([3], np.int64)])
            flat = b.op("ReduceProd", [inner], keepdims=1) if b.opset < 18 else b.op("ReduceProd", [inner, zero], keepdims=1)
            target = b.op("Concat", [b.op("Gather", [full, zero], axis=0), flat], axis=0)
            b.output(b.op("Reshape", [x, target]), F32, [None, None])
        elif gadget == "merge_leading":  # [d0*d1, W]
            d0, d1 = b.op("Gather", [full, zero], axis=0), b.op("Gather", [full, one], axis=0)
            target = b.op("Concat", [binary(b, draw, "Mul", d0, d1), b.const([W], np.int64)], axis=0)
            b.output(b.op("Reshape", [x, target]), F32, [None, W])
        elif gadget == "reshape_minus_one":
            b.output(b.op("Reshape", [x, b.const([-1, W], np.int64)]), F32, [None, W])
        elif gadget == "size":
            sz = b.op("Cast", [b.op("Size", [x])], to=F32)
            b.output(binary(b, draw, "Add", x, sz), F32)
        elif gadget == "gather_scalar_arith":  # x + float(d1 * 2 - 1)
            d1 = b.op("Gather", [full, b.const(1, np.int64)], axis=0)
            v = b.op("Sub", [binary(b, draw, "Mul", d1, b.const(2, np.int64)), b.const(1, np.int64)])
            b.output(binary(b, draw, "Add", x, b.op("Cast", [v], to=F32)), F32)
        elif gadget == "slice_shape":  # Reshape(x, Concat(Slice(shape, 0, 2), [W]))
            lead = b.op("Slice", [full, zero, b.const([2], np.int64)])
            b.output(b.op("Reshape", [x, b.op("Concat", [lead, b.const([W], np.int64)], axis=0)]), F32, [None, None, W])
        elif gadget == "mask_len" and mask is not None:  # x + float(total_len - seq_len)
            t = b.op("Gather", [b.op("Shape", [mask]), one], axis=0)
            s = b.op("Gather", [full, one], axis=0)
            b.output(binary(b, draw, "Add", x, b.op("Cast", [b.op("Sub", [t, s])], to=F32)), F32)
        elif gadget == "expand":  # Expand a constant row to x's shape
            row = b.const(vector(draw, W, np.float32), np.float32)
            b.output(binary(b, draw, "Mul", x, b.op("Expand", [row, full])), F32)
        elif gadget == "const_of_shape":
            fill = b.op("ConstantOfShape", [full], value=numpy_helper.from_array(np.array([0.5], np.float32)))
            b.output(binary(b, draw, "Add", x, fill), F32)
        elif gadget == "range":  # x + Range(0, W, 1) as float
            r = b.op("Range", [b.const(0, np.int64), b.op("Squeeze", [b.op("Gather", [full, b.const([2], np.int64)], axis=0), zero]),
                               b.const(1, np.int64)])  # fmt: skip
            b.output(binary(b, draw, "Add", x, b.op("Cast", [r], to=F32)), F32)
        else:
            b.output(b.op("Identity", [x]), F32)
    if chance(draw, 2):
        tags.append("shape_is_output")
        b.output(full, I64)
