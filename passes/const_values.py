"""Reading a graph's constants as a fusion sees them: through Identity copies, as scalars, within a tolerance."""

from __future__ import annotations

from typing import Any

import numpy as np

from passes.constants import CONST_RTOL
from qgraph.ir.graph import Graph, Node, Tensor

#: How many Identity (or Cast) hops a walk follows before it gives up.
MAX_HOPS = 4


def default_domain(node: Node) -> bool:
    """True for a node of ONNX's default domain (graphsurgeon reads an unset domain as None)."""
    return node.domain in (None, "", "ai.onnx")


def const_value(graph: Graph, tensor: Tensor | None) -> np.ndarray | None:
    """:meth:`Graph.const_value`, also through Identity and for Constant nodes with no domain.

    TorchScript exports deduplicate equal initializers and read the copies
    through Identity nodes (a random-weight model's LayerNorm gammas are all
    ones). Workaround: Graph.const_value accepts a Constant node only with
    domain "" or "ai.onnx", but graphsurgeon imports an unset domain (as in
    TorchScript exports) as None; drop that part once it accepts None.
    """
    for _ in range(MAX_HOPS):
        value = graph.const_value(tensor)
        if value is not None or tensor is None:
            return value
        prod = graph.producer(tensor)
        if prod is None:
            return None
        if prod.op == "Constant" and prod.domain is None and "value" in prod.attrs:
            v = prod.attrs["value"]
            return np.asarray(getattr(v, "values", v))
        if prod.op != "Identity" or not default_domain(prod):
            return None
        tensor = prod.inputs[0]
    return None


class Scalar(float):
    """A constant scalar's value; ``rtol`` is how closely its dtype can hold a formula's constant."""

    rtol: float = CONST_RTOL


def scalar(graph: Graph, tensor: Tensor | None) -> Scalar | None:
    """The single value of a constant with one element and rank 0 or 1, else None.

    A one-element constant of rank 2 or more is not a scalar: it can broadcast
    the result to a higher rank (x[2, 4] * [[[0.5]]] is [1, 2, 4]), which a
    fused node would not.
    """
    v = const_value(graph, tensor)
    if v is None or v.size != 1 or v.ndim > 1:
        return None
    return to_scalar(v)


def to_scalar(v: np.ndarray) -> Scalar:
    """The one value of ``v`` as a :class:`Scalar` that knows its dtype's precision."""
    value = Scalar(float(v.reshape(())))
    try:
        # A float16 graph stores 0.044715 as 0.0447083 (1.5e-4 off).
        value.rtol = max(CONST_RTOL, float(np.finfo(v.dtype).eps))
    except (TypeError, ValueError):
        pass  # an integer constant
    return value


def close(value: float, target: float) -> bool:
    """``value`` is ``target`` within CONST_RTOL, or within its dtype's precision (see :class:`Scalar`)."""
    return abs(value - target) <= getattr(value, "rtol", CONST_RTOL) * abs(target)


def dtype_and_shape(graph: Graph, w: Tensor) -> tuple[np.dtype[Any], list[int]]:
    """A constant's element type and shape: an initializer's from its header, a Constant node's from its (inline) value."""
    if isinstance(w.shape, (list, tuple)) and all(isinstance(d, int) for d in w.shape) and w.dtype is not None:
        return np.dtype(w.dtype), [int(d) for d in w.shape]
    value = graph.const_value(w)
    return (value.dtype, list(value.shape)) if value is not None else (np.dtype(np.float32), [])
