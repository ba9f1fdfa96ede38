"""Shapes as the passes read them: static or not, rank, last dimension; views that move nothing; a Reshape read through
the reshapes before it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.ir.validate import is_onnx_op

#: Ops that change a tensor's shape and keep its elements in order.
RESHAPE_LIKE = ("Reshape", "Unsqueeze", "Squeeze", "Flatten")


def is_static(shape: Sequence[Any] | None) -> bool:
    """True if ``shape`` is known and every dimension is a non-negative int."""
    return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)


def static_dims(shape: Sequence[Any] | None, rank: int | None = None) -> list[int] | None:
    """The dimensions as ints if every one is a positive number (and there are ``rank`` of them), else None.

    Positive: a 0 in a Reshape's target shape means "copy", so rewrites that
    write shapes out keep away from empty tensors.
    """
    if shape is None or (rank is not None and len(shape) != rank):
        return None
    if not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        return None
    return [int(d) for d in shape]


def rank_of(tensor: Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def last_dim(tensor: Tensor) -> int | None:
    shape = tensor.shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def read_through(graph: Graph, reshape: Node, prefix: str, inner_ops: Sequence[str] = ("Reshape",)) -> bool:
    """``Reshape(inner(x))`` -> ``Reshape(x, its static output shape)`` when ``inner`` is one of ``inner_ops`` (ops
    that keep the elements in order); True if ``reshape`` was rewired (``inner`` stays for its other readers)."""
    shape = static_dims(reshape.outputs[0].shape)
    inner = graph.producer(reshape.inputs[0])
    if shape is None or not is_onnx_op(inner, *inner_ops) or not inner.inputs:
        return False
    reshape.inputs[0] = inner.inputs[0]
    reshape.inputs[1] = graph.constant(prefix, np.array(shape, np.int64))
    reshape.attrs.pop("allowzero", None)
    return True


def unit_transpose(node: Node) -> bool:
    """True if ``node`` is a Transpose of a static shape that only moves size-1 axes (the elements stay in order: a
    reshape)."""
    shape = static_dims(node.inputs[0].shape) if is_onnx_op(node, "Transpose") and node.inputs else None
    if shape is None or static_dims(node.outputs[0].shape) is None:
        return False
    perm: Any = node.attrs.get("perm")
    perm = list(range(len(shape)))[::-1] if perm is None else [int(p) for p in perm]
    moved = [p for p in perm if shape[p] != 1]
    return len(perm) == len(shape) and moved == sorted(moved)
