"""The numpy kernels that fold constants, and onnx's reference evaluator for every other op.

Each kernel follows the op's ONNX definition for the opsets exporters use;
inputs arrive as numpy arrays (None for an omitted optional input). A kernel
raises :class:`Decline` on inputs it will not evaluate (an index out of range,
a result over :data:`~passes.constants.MAX_FOLD_BYTES`); :func:`run_kernel`
turns that, and any error of the reference evaluator, into None.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from onnx import helper, numpy_helper

from passes.constants import MAX_FOLD_BYTES
from qgraph.ir.graph import Constant, Node

log = logging.getLogger(__name__)

#: numpy dtypes the kernels handle; anything else (bfloat16, float8, strings) goes to the reference evaluator.
PLAIN_DTYPES = frozenset(
    np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                          np.float16, np.float32, np.float64)
)  # fmt: skip

Kernel = Callable[[Node, list[np.ndarray | None]], list[np.ndarray]]


class Decline(Exception):
    """A kernel cannot evaluate this node (bad or unusual inputs); leave it."""


def ints(a: np.ndarray | None) -> list[int]:
    """An integer tensor (shape, axes, starts, ...) as a flat list; [] for an omitted input."""
    if a is None:
        return []
    return [int(x) for x in np.asarray(a).reshape(-1)]


def _axes(node: Node, ins: list[np.ndarray | None], index: int, attr: str = "axes") -> list[int] | None:
    """Axes given as input ``index`` (newer opsets) or as an attribute (older ones)."""
    if len(ins) > index and ins[index] is not None:
        return ints(ins[index])
    if attr in node.attrs:
        return [int(a) for a in node.attrs[attr]]
    return None


def _norm_axis(axis: int, rank: int) -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < max(rank, 1):
        raise Decline(f"axis {axis} out of range for rank {rank}")
    return a


def _np(x: Any, like: np.ndarray | None = None) -> np.ndarray:
    arr = np.asarray(x)
    return arr.astype(like.dtype, copy=False) if like is not None and arr.dtype != like.dtype else arr


def _attr_dtype(to: int) -> np.dtype:
    try:
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(int(to)))
    except (KeyError, TypeError, ValueError):
        raise Decline(f"Cast to ONNX type {to}") from None
    if dt not in PLAIN_DTYPES:
        raise Decline(f"Cast to {dt}")
    return dt


# --------------------------------------------------------------------------- kernels


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Kernel:
    def k(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
        (x,) = ins[:1]
        assert x is not None
        return [_np(fn(x), x)]

    return k


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], keep_dtype: bool = True) -> Kernel:
    def k(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
        a, b = ins[0], ins[1]
        assert a is not None and b is not None
        out = np.asarray(fn(a, b))
        return [_np(out, a) if keep_dtype else out]

    return k


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu":
        if np.any(b == 0):
            raise Decline("integer division by zero")
        q = np.floor_divide(a, b)
        # ONNX (like C) truncates toward zero; floor_divide rounds down.
        return np.where((a - q * b != 0) & ((a < 0) != (b < 0)), q + 1, q)
    return np.true_divide(a, b)


def _pow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu" and np.any(b < 0):
        raise Decline("integer base with a negative exponent")
    return np.power(a, b)


def _variadic(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Kernel:
    def k(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
        xs = [x for x in ins if x is not None]
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return [_np(out, xs[0])]

    return k


def _gather(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    data, idx = ins[0], ins[1]
    assert data is not None and idx is not None
    axis = _norm_axis(int(node.attrs.get("axis", 0)), data.ndim)
    n = data.shape[axis]
    if np.any(idx < -n) or np.any(idx >= n):
        raise Decline("Gather index out of range")
    return [np.take(data, idx.astype(np.int64), axis=axis)]


def _unsqueeze(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    assert x is not None
    axes = _axes(node, ins, 1)
    if not axes:
        raise Decline("Unsqueeze without axes")
    rank = x.ndim + len(axes)
    norm = sorted(_norm_axis(a, rank) for a in axes)
    if len(set(norm)) != len(norm):
        raise Decline("repeated Unsqueeze axes")
    return [np.expand_dims(x, tuple(norm))]


def _squeeze(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    assert x is not None
    axes = _axes(node, ins, 1)
    if axes is None:
        return [np.squeeze(x)]
    norm = tuple(_norm_axis(a, x.ndim) for a in axes)
    if any(x.shape[a] != 1 for a in norm):
        raise Decline("Squeeze of a dimension that is not 1")
    return [np.squeeze(x, axis=norm)]


def _concat(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    xs = [x for x in ins if x is not None]
    axis = _norm_axis(int(node.attrs["axis"]), xs[0].ndim)
    return [np.concatenate(xs, axis=axis)]


def _slice(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    assert x is not None
    if len(ins) >= 3:
        starts, ends = ints(ins[1]), ints(ins[2])
        axes = ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    else:  # opset 1: attributes
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    return [x[slices(x.ndim, starts, ends, axes, steps)]]


def slices(rank: int, starts: list[int], ends: list[int], axes: list[int], steps: list[int]) -> tuple[slice, ...]:
    """The numpy index of a Slice on a tensor of ``rank`` (raises :class:`Decline` if the parameters are malformed)."""
    # Python's slice clamping is ONNX's (the reference implementation uses it too).
    if not (len(starts) == len(ends) == len(axes) == len(steps)) or 0 in steps:
        raise Decline("malformed Slice parameters")
    sl = [slice(None)] * rank
    for s, e, a, st in zip(starts, ends, axes, steps):
        sl[_norm_axis(a, rank)] = slice(s, e, st)
    return tuple(sl)


def _cast(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    assert x is not None
    return [x.astype(_attr_dtype(node.attrs["to"]))]


def _range(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    start, limit, delta = ins[0], ins[1], ins[2]
    assert start is not None and limit is not None and delta is not None
    s, lim, d = start.reshape(()).item(), limit.reshape(()).item(), delta.reshape(()).item()
    if d == 0:
        raise Decline("Range with delta 0")
    n = max(math.ceil((lim - s) / d), 0)
    if n * start.dtype.itemsize > MAX_FOLD_BYTES:
        raise Decline("Range result too large")
    return [(s + np.arange(n) * d).astype(start.dtype)]


def _where(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    c, x, y = ins[0], ins[1], ins[2]
    assert c is not None and x is not None and y is not None
    return [_np(np.where(c, x, y), x)]


def _reshape(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    if len(ins) < 2 or ins[1] is None or x is None:
        raise Decline("Reshape without a shape input (opset < 5)")
    shape = ints(ins[1])
    if not int(node.attrs.get("allowzero", 0)):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _out_bytes(shape: Sequence[int], dtype: np.dtype) -> int:
    if any(d < 0 for d in shape):
        raise Decline("negative dimension")
    return math.prod(shape) * dtype.itemsize


def _constant_of_shape(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    shape = ints(ins[0])
    value = node.attrs.get("value")
    fill = np.zeros((), np.float32) if value is None else np.asarray(value.values).reshape(-1)[:1].reshape(())
    if fill.dtype not in PLAIN_DTYPES:
        raise Decline(f"ConstantOfShape of {fill.dtype}")
    if _out_bytes(shape, fill.dtype) > MAX_FOLD_BYTES:
        raise Decline("result too large")
    return [np.full(shape, fill, dtype=fill.dtype)]


def _expand(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    assert x is not None
    shape = np.broadcast_shapes(x.shape, tuple(ints(ins[1])))
    if _out_bytes(shape, x.dtype) > MAX_FOLD_BYTES:
        raise Decline("result too large")
    return [np.array(np.broadcast_to(x, shape))]


def _reduce_prod(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    assert x is not None
    axes = _axes(node, ins, 1)
    keep = bool(int(node.attrs.get("keepdims", 1)))
    if not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            return [x]
        axes = list(range(x.ndim))
    return [_np(np.prod(x, axis=tuple(_norm_axis(a, x.ndim) for a in axes), keepdims=keep), x)]


def _transpose(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    assert x is not None
    perm = node.attrs.get("perm")
    return [np.transpose(x, None if perm is None else [int(p) for p in perm])]


def _trilu(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    assert x is not None
    k = int(ints(ins[1])[0]) if len(ins) > 1 and ins[1] is not None else 0
    if x.ndim < 2:
        raise Decline("Trilu needs rank >= 2")
    return [np.triu(x, k) if int(node.attrs.get("upper", 1)) else np.tril(x, k)]


def _identity(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    assert x is not None
    return [x]


#: The numpy kernels, by op type (default domain).
KERNELS: dict[str, Kernel] = {
    "Identity": _identity,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Slice": _slice,
    "Cast": _cast,
    "Range": _range,
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(_div),
    "Pow": _binary(_pow),
    "Equal": _binary(np.equal, keep_dtype=False),
    "Less": _binary(np.less, keep_dtype=False),
    "Greater": _binary(np.greater, keep_dtype=False),
    "LessOrEqual": _binary(np.less_equal, keep_dtype=False),
    "GreaterOrEqual": _binary(np.greater_equal, keep_dtype=False),
    "And": _binary(np.logical_and, keep_dtype=False),
    "Or": _binary(np.logical_or, keep_dtype=False),
    "Not": _unary(np.logical_not),
    "Where": _where,
    "Reshape": _reshape,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Min": _variadic(np.minimum),
    "Max": _variadic(np.maximum),
    "Neg": _unary(np.negative),
    "Abs": _unary(np.abs),
    "Sqrt": _unary(np.sqrt),
    "Floor": _unary(np.floor),
    "Ceil": _unary(np.ceil),
    "ReduceProd": _reduce_prod,
    "Transpose": _transpose,
    "Trilu": _trilu,
}


# --------------------------------------------------------------------------- fallback


def _attr_proto(name: str, value: Any) -> Any:
    if isinstance(value, Constant):
        return helper.make_attribute(name, numpy_helper.from_array(np.asarray(value.values)))
    if isinstance(value, (list, tuple)) and not value:
        raise Decline(f"empty list attribute '{name}'")
    return helper.make_attribute(name, value)


def _reference(node: Node, ins: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Evaluate one node with onnx's reference implementation."""
    from onnx.reference import ReferenceEvaluator  # slow to import; only when needed

    in_names = [f"i{i}" if x is not None else "" for i, x in enumerate(ins)]
    out_names = [f"o{i}" if not t.is_empty() else "" for i, t in enumerate(node.outputs)]
    proto = helper.make_node(node.op, in_names, out_names)
    proto.attribute.extend(_attr_proto(k, v) for k, v in node.attrs.items())
    ev = ReferenceEvaluator(proto, opsets={"": opset})
    results = ev.run([n for n in out_names if n], {n: x for n, x in zip(in_names, ins) if n})
    it = iter(results)
    return [np.asarray(next(it)) if n else np.zeros(0) for n in out_names]


def run_kernel(node: Node, ins: list[np.ndarray | None], opset: int) -> list[np.ndarray] | None:
    """The node's outputs for these input values (a kernel, else the reference evaluator), or None if it declines."""
    kernel = KERNELS.get(node.op)
    plain = all(x is None or x.dtype in PLAIN_DTYPES for x in ins)
    try:
        with np.errstate(all="ignore"):
            if kernel is not None and plain:
                out = kernel(node, ins)
            else:
                out = _reference(node, ins, opset)
    except Decline as e:
        log.debug("not folding %s (%s): %s", node.name, node.op, e)
        return None
    except Exception as e:  # a malformed node, or an op the reference evaluator lacks
        log.debug("not folding %s (%s): %s: %s", node.name, node.op, type(e).__name__, e)
        return None
    # numpy hands back scalars (np.int64) for 0-d results.
    out = [np.asarray(r) if isinstance(r, np.generic) else r for r in out]
    if len(out) != len(node.outputs) or not all(isinstance(r, np.ndarray) for r in out):
        return None
    return [np.asarray(r, order="C") for r in out]  # (ascontiguousarray would make 0-d 1-d)
