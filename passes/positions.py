"""What the attention passes prove about positions: a per-row value seen through views, and a slot that equals
the position wherever the position is valid (p >= 0), for fuse-decode-attention and fuse-attention-rotary.

retain-kv-cache sends padding tokens (p = -1) to a harmless slot with ``Where(x >= 0, x, _)`` and
``Where(x < 0, _, x)``; both are x wherever x >= 0, which is what these proofs walk through.
"""

from __future__ import annotations

import numpy as np

from passes.shapes import static_dims
from qgraph.ir.graph import Graph, Tensor
from qgraph.ir.validate import is_onnx_op

#: Ops that move a per-row value between [B, 1] and [B, 1, 1, 1] without changing it.
ROW_VIEW_OPS = ("Unsqueeze", "Reshape", "Squeeze", "Identity")


def row_value(graph: Graph, t: Tensor, b: int, count: int) -> Tensor:
    """``t`` with views that keep its ``count`` values in B rows (Unsqueeze, Reshape, ...) stripped off."""
    while True:
        prod = graph.producer(t)
        if prod is None or not is_onnx_op(prod, *ROW_VIEW_OPS):
            return t
        src = prod.inputs[0]
        dims = static_dims(src.shape)
        if dims is None or int(np.prod(dims)) != count or (dims and dims[0] != b):
            return t
        t = src


def equal_when_valid(graph: Graph, t: Tensor, p: Tensor, b: int, count: int, depth: int = 8) -> bool:
    """True if ``t`` provably equals ``p`` wherever p >= 0 (both ``count`` values in B rows)."""
    t, p = row_value(graph, t, b, count), row_value(graph, p, b, count)
    if t is p:
        return True
    where = graph.producer(t)
    if depth == 0 or not is_onnx_op(where, "Where"):
        return False
    cond, x, y = where.inputs
    test = graph.producer(cond)
    if test is None or graph.scalar(test.inputs[1]) != 0:
        return False
    if is_onnx_op(test, "GreaterOrEqual") and test.inputs[0] is x:  # Where(x >= 0, x, _) is x when x >= 0
        return equal_when_valid(graph, x, p, b, count, depth - 1)
    if is_onnx_op(test, "Less") and test.inputs[0] is y:  # Where(x < 0, _, x) is x when x >= 0
        return equal_when_valid(graph, y, p, b, count, depth - 1)
    return False
