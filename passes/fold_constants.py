"""Fold constants: evaluate every node whose inputs are all known, once, ahead of time.

A node is folded when each of its inputs is a constant (an initializer, or the
output of a ``Constant`` node, which this pass turns into an initializer), and
``Shape``/``Size`` are folded when the dimensions they read are static after
shape inference (they never read their input's values, so the shape of a
100 MB weight folds for free). ``Gather``/``Slice`` of a partly static shape
fold too when they pick only static dimensions (``Shape(x)[2]`` with x of
shape [batch, seq, 768] is 768).

One forward sweep reaches the fixed point: the graph is in topological order,
so by the time a node is visited every input that can become constant already
has. (On an unsorted graph the sweep is still correct; it just folds less.)

The common shape-computation ops are evaluated by the small numpy kernels in
:data:`KERNELS`; any other default-domain op falls back to
``onnx.reference.ReferenceEvaluator`` on that one node. Never folded: nodes
with subgraphs, ops from other domains, random ops, and anything whose
constant inputs or result exceed :data:`MAX_FOLD_BYTES` (1 MiB), so large
weights stay lazy and external instead of being materialized (a ``Transpose``
of a 100 MB weight stays a ``Transpose``).

Folded results are new initializers ``fold-constants/<n>``; a folded graph
output keeps its name and is produced by a ``Constant`` node instead.
:func:`fold_constants` is the sweep without shape inference, for passes that
run inference themselves (``pin-static-shapes``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from onnx import helper, numpy_helper

from passes.constants import MAX_FOLD_BYTES
from passes.shapes import is_static
from qgraph.errors import GraphCheckError
from qgraph.ir.graph import Constant, Graph, Node, Tensor
from qgraph.pipeline.manager import Pass, PassResult

log = logging.getLogger(__name__)


#: Ops whose value is not a function of their inputs.
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"})
#: Ops that make sequences, optionals or other non-tensor values (nothing to fold them into).
NON_TENSOR_OPS = frozenset(
    {
        "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt", "SequenceLength",
        "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement", "OptionalHasElement",
    }
)  # fmt: skip
_DEFAULT_DOMAINS = ("", "ai.onnx", None)
#: numpy dtypes the kernels handle; anything else (bfloat16, float8, strings) goes to the reference evaluator.
_PLAIN_DTYPES = frozenset(
    np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                          np.float16, np.float32, np.float64)
)  # fmt: skip

Kernel = Callable[[Node, list[np.ndarray | None]], list[np.ndarray]]


class _Decline(Exception):
    """A kernel cannot evaluate this node (bad or unusual inputs); leave it."""


# --------------------------------------------------------------------------- helpers


def const_nbytes(tensor: Tensor) -> int | None:
    """Size in bytes of an initializer without loading it (None if unknown)."""
    if not isinstance(tensor, Constant):
        return None
    vals = tensor._values
    nbytes = getattr(vals, "nbytes", None)
    if nbytes is None:
        return None
    return int(nbytes)


def _tensor_nbytes(tensor: Tensor) -> int | None:
    """Bytes a tensor of this static shape and dtype would take, if both are known."""
    shape, dtype = tensor.shape, tensor.dtype
    if not is_static(shape) or dtype is None:
        return None
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:
        return None
    return math.prod(int(d) for d in shape) * itemsize


def _ints(a: np.ndarray | None) -> list[int]:
    if a is None:
        return []
    return [int(x) for x in np.asarray(a).reshape(-1)]


def _axes(node: Node, ins: list[np.ndarray | None], index: int, attr: str = "axes") -> list[int] | None:
    """Axes given as input ``index`` (newer opsets) or as an attribute (older ones)."""
    if len(ins) > index and ins[index] is not None:
        return _ints(ins[index])
    if attr in node.attrs:
        return [int(a) for a in node.attrs[attr]]
    return None


def _norm_axis(axis: int, rank: int) -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < max(rank, 1):
        raise _Decline(f"axis {axis} out of range for rank {rank}")
    return a


def _np(x: Any, like: np.ndarray | None = None) -> np.ndarray:
    arr = np.asarray(x)
    return arr.astype(like.dtype, copy=False) if like is not None and arr.dtype != like.dtype else arr


def _attr_dtype(to: int) -> np.dtype:
    try:
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(int(to)))
    except (KeyError, TypeError, ValueError):
        raise _Decline(f"Cast to ONNX type {to}") from None
    if dt not in _PLAIN_DTYPES:
        raise _Decline(f"Cast to {dt}")
    return dt


# --------------------------------------------------------------------------- kernels
# Each kernel follows the op's ONNX definition for the opsets exporters use;
# inputs arrive as numpy arrays (None for an omitted optional input).


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
            raise _Decline("integer division by zero")
        q = np.floor_divide(a, b)
        # ONNX (like C) truncates toward zero; floor_divide rounds down.
        return np.where((a - q * b != 0) & ((a < 0) != (b < 0)), q + 1, q)
    return np.true_divide(a, b)


def _pow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu" and np.any(b < 0):
        raise _Decline("integer base with a negative exponent")
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
        raise _Decline("Gather index out of range")
    return [np.take(data, idx.astype(np.int64), axis=axis)]


def _unsqueeze(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    assert x is not None
    axes = _axes(node, ins, 1)
    if not axes:
        raise _Decline("Unsqueeze without axes")
    rank = x.ndim + len(axes)
    norm = sorted(_norm_axis(a, rank) for a in axes)
    if len(set(norm)) != len(norm):
        raise _Decline("repeated Unsqueeze axes")
    return [np.expand_dims(x, tuple(norm))]


def _squeeze(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    assert x is not None
    axes = _axes(node, ins, 1)
    if axes is None:
        return [np.squeeze(x)]
    norm = tuple(_norm_axis(a, x.ndim) for a in axes)
    if any(x.shape[a] != 1 for a in norm):
        raise _Decline("Squeeze of a dimension that is not 1")
    return [np.squeeze(x, axis=norm)]


def _concat(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    xs = [x for x in ins if x is not None]
    axis = _norm_axis(int(node.attrs["axis"]), xs[0].ndim)
    return [np.concatenate(xs, axis=axis)]


def _slice(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    assert x is not None
    if len(ins) >= 3:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    else:  # opset 1: attributes
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    return [x[_slices(x.ndim, starts, ends, axes, steps)]]


def _slices(rank: int, starts: list[int], ends: list[int], axes: list[int], steps: list[int]) -> tuple[slice, ...]:
    # Python's slice clamping is ONNX's (the reference implementation uses it too).
    if not (len(starts) == len(ends) == len(axes) == len(steps)) or 0 in steps:
        raise _Decline("malformed Slice parameters")
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
        raise _Decline("Range with delta 0")
    n = max(math.ceil((lim - s) / d), 0)
    if n * start.dtype.itemsize > MAX_FOLD_BYTES:
        raise _Decline("Range result too large")
    return [(s + np.arange(n) * d).astype(start.dtype)]


def _where(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    c, x, y = ins[0], ins[1], ins[2]
    assert c is not None and x is not None and y is not None
    return [_np(np.where(c, x, y), x)]


def _reshape(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    if len(ins) < 2 or ins[1] is None or x is None:
        raise _Decline("Reshape without a shape input (opset < 5)")
    shape = _ints(ins[1])
    if not int(node.attrs.get("allowzero", 0)):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _out_bytes(shape: Sequence[int], dtype: np.dtype) -> int:
    if any(d < 0 for d in shape):
        raise _Decline("negative dimension")
    return math.prod(shape) * dtype.itemsize


def _constant_of_shape(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    shape = _ints(ins[0])
    value = node.attrs.get("value")
    fill = np.zeros((), np.float32) if value is None else np.asarray(value.values).reshape(-1)[:1].reshape(())
    if fill.dtype not in _PLAIN_DTYPES:
        raise _Decline(f"ConstantOfShape of {fill.dtype}")
    if _out_bytes(shape, fill.dtype) > MAX_FOLD_BYTES:
        raise _Decline("result too large")
    return [np.full(shape, fill, dtype=fill.dtype)]


def _expand(node: Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    x = ins[0]
    assert x is not None
    shape = np.broadcast_shapes(x.shape, tuple(_ints(ins[1])))
    if _out_bytes(shape, x.dtype) > MAX_FOLD_BYTES:
        raise _Decline("result too large")
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
    k = int(_ints(ins[1])[0]) if len(ins) > 1 and ins[1] is not None else 0
    if x.ndim < 2:
        raise _Decline("Trilu needs rank >= 2")
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
        raise _Decline(f"empty list attribute '{name}'")
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


# --------------------------------------------------------------------------- shapes


def _shape_dims(node: Node) -> list[Any] | None:
    """The dimensions a Shape node reads (honouring start/end), or None if the rank is unknown."""
    shape = node.inputs[0].shape
    if shape is None:
        return None
    rank = len(shape)
    start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))
    start, end = (s + rank if s < 0 else s for s in (start, end))
    return list(shape[min(max(start, 0), rank) : min(max(end, 0), rank)])


def _partial_pick(node: Node, dims: list[Any], ins: list[np.ndarray | None]) -> list[Any] | None:
    """Gather or Slice applied to a partly known shape vector (None: cannot tell)."""
    if node.op == "Gather" and ins[1] is not None and int(node.attrs.get("axis", 0)) in (0, -1):
        idx = ins[1].astype(np.int64)
        if np.any(idx < -len(dims)) or np.any(idx >= len(dims)) or idx.ndim > 1:
            return None
        picked = [dims[int(i)] for i in idx.reshape(-1)]
        return picked if idx.ndim == 1 else picked[:1]
    if node.op == "Slice" and len(ins) >= 3 and all(x is not None for x in ins[1:]):
        try:
            sl = _slices(1, _ints(ins[1]), _ints(ins[2]), _ints(ins[3]) if len(ins) > 3 else [0],
                         _ints(ins[4]) if len(ins) > 4 else [1])  # fmt: skip
        except _Decline:
            return None
        return dims[sl[0]]
    return None


# --------------------------------------------------------------------------- the sweep


def fold_constants(graph: Graph, prefix: str = "fold-constants", *, max_bytes: int = MAX_FOLD_BYTES) -> dict[str, int]:
    """Fold every foldable node in one forward sweep; returns the stats.

    Uses the shapes the graph already has (run shape inference first to fold
    more ``Shape`` ops). New constants and nodes are named ``<prefix>/<n>``.
    """
    opset = graph.opset() or 1
    outputs = {id(t) for t in graph.outputs}
    stats = {"folded": 0, "constant_nodes": 0, "too_large": 0}
    dead: list[Node] = []
    # Output tensors of Shape (and Gather/Slice of them) whose dims are known only in part.
    partial: dict[int, list[Any]] = {}
    for node in graph.nodes:
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        if node.op == "Constant":
            done = _constant_to_initializer(graph, node, outputs, prefix)
            if done:
                stats["constant_nodes"] += 1
            if done == "converted":
                dead.append(node)
            continue
        if node.op in RANDOM_OPS or node.op in NON_TENSOR_OPS or _has_subgraph(node):
            continue
        results = _evaluate(graph, node, opset, max_bytes, partial, stats)
        if results is None:
            continue
        _replace_outputs(graph, node, results, outputs, prefix)
        stats["folded"] += 1
        dead.append(node)
        log.debug("%s: folded %s (%s)", prefix, node.name, node.op)
    graph.remove_nodes(dead)
    return {k: v for k, v in stats.items() if v}


def _has_subgraph(node: Node) -> bool:
    return any(type(v).__name__ == "Graph" or (isinstance(v, list) and v and type(v[0]).__name__ == "Graph")
               for v in node.attrs.values())  # fmt: skip


def _constant_to_initializer(graph: Graph, node: Node, outputs: set[int], prefix: str) -> str | None:
    """Turn a Constant node into an initializer of the same name.

    A Constant node that makes a graph output stays (the output keeps its
    producer); its other readers get an initializer of its value.
    """
    if len(node.outputs) != 1:
        return None
    out = node.outputs[0]
    if id(out) in outputs and not out.outputs:
        return None
    value = graph.const_value(out)
    if value is None:  # sparse or string constants: leave them
        return None
    if id(out) in outputs:
        _rewire(out, graph.constant(prefix, np.asarray(value)))
        return "rewired"
    node.outputs.clear()
    out.to_constant(np.asarray(value))
    return "converted"


def _evaluate(
    graph: Graph, node: Node, opset: int, max_bytes: int, partial: dict[int, list[Any]], stats: dict[str, int]
) -> list[np.ndarray] | None:
    """The values of a node's outputs if it can be folded, else None."""
    if node.op in ("Shape", "Size"):
        if node.op == "Size":
            shape = node.inputs[0].shape
            return [np.asarray(math.prod(int(d) for d in shape), np.int64)] if is_static(shape) else None
        dims = _shape_dims(node)
        if dims is None:
            return None
        if is_static(dims):
            return [np.asarray(dims, np.int64)]
        partial[id(node.outputs[0])] = dims
        return None
    for t in node.inputs:
        if not t.is_empty() and not isinstance(t, Constant):
            if id(t) in partial and node.op in ("Gather", "Slice") and t is node.inputs[0]:
                return _fold_partial(graph, node, partial)
            return None
    if not node.outputs:
        return None
    # Sizes are checked before any value is loaded, so a large weight stays lazy.
    in_bytes = [const_nbytes(t) for t in node.inputs if not t.is_empty()]
    out_bytes = [_tensor_nbytes(t) for t in node.outputs]
    if any(b is None or b > max_bytes for b in in_bytes) or any(b is not None and b > max_bytes for b in out_bytes):
        stats["too_large"] += 1
        return None
    ins = [None if t.is_empty() else graph.const_value(t) for t in node.inputs]
    results = _run_kernel(node, ins, opset)
    if results is None:
        return None
    if any(r.nbytes > max_bytes for r in results):
        stats["too_large"] += 1
        return None
    for out, r in zip(node.outputs, results):
        if is_static(out.shape) and tuple(out.shape) != r.shape:
            # A kernel and shape inference disagree: leave the node to the runtime.
            log.warning("not folding %s (%s): result shape %s, inferred %s", node.name, node.op, r.shape, out.shape)
            return None
    return results


def _fold_partial(graph: Graph, node: Node, partial: dict[int, list[Any]]) -> list[np.ndarray] | None:
    ins: list[np.ndarray | None] = [None]
    for t in node.inputs[1:]:
        if not t.is_empty() and not isinstance(t, Constant):
            return None
        ins.append(None if t.is_empty() else graph.const_value(t))
    picked = _partial_pick(node, partial[id(node.inputs[0])], ins)
    if picked is None:
        return None
    scalar = node.op == "Gather" and ins[1] is not None and ins[1].ndim == 0
    if not is_static(picked):
        if not scalar:  # only shape vectors are tracked
            partial[id(node.outputs[0])] = picked
        return None
    return [np.asarray(picked[0] if scalar else picked, np.int64)]


def _run_kernel(node: Node, ins: list[np.ndarray | None], opset: int) -> list[np.ndarray] | None:
    kernel = KERNELS.get(node.op)
    plain = all(x is None or x.dtype in _PLAIN_DTYPES for x in ins)
    try:
        with np.errstate(all="ignore"):
            if kernel is not None and plain:
                out = kernel(node, ins)
            else:
                out = _reference(node, ins, opset)
    except _Decline as e:
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


def _rewire(old: Tensor, new: Tensor) -> None:
    """Make every node that reads ``old`` read ``new`` (graph outputs are left alone)."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def _replace_outputs(graph: Graph, node: Node, results: list[np.ndarray], outputs: set[int], prefix: str) -> None:
    for out, value in zip(list(node.outputs), results):
        if out.is_empty():
            continue
        if out.dtype is not None:
            try:
                value = value.astype(np.dtype(out.dtype), copy=False)
            except TypeError:
                pass
        _rewire(out, graph.constant(prefix, value))
        if id(out) in outputs:
            # A graph output keeps its name: a Constant node now produces it.
            graph.add_node("Constant", [], [out], {"value": graph.constant(prefix, value)}, prefix=prefix, after=node)


# --------------------------------------------------------------------------- the pass


class FoldConstants(Pass):
    """Evaluate constant subgraphs and static ``Shape``/``Size`` ahead of time.

    ``infer_shapes`` (default True) runs ONNX shape inference first, so that
    every ``Shape`` of a statically shaped tensor folds; ``max_bytes`` bounds
    the size of any constant input or result that is folded.
    """

    name = "fold-constants"

    def __init__(self, *, infer_shapes: bool = True, max_bytes: int = MAX_FOLD_BYTES) -> None:
        self.infer_shapes = infer_shapes
        self.max_bytes = max_bytes

    def run(self, graph: Graph) -> PassResult:
        if self.infer_shapes:
            try:
                graph.infer_shapes()
            except GraphCheckError as e:
                log.warning("%s: shape inference failed, folding with the shapes the graph has (%s)", self.name, e)
        stats = fold_constants(graph, self.name, max_bytes=self.max_bytes)
        modified = bool(stats.get("folded") or stats.get("constant_nodes"))
        log.info("%s: %s", self.name, stats or "nothing to fold")
        return PassResult(graph, modified, stats)
