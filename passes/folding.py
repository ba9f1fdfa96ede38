"""Constant folding: evaluate every node whose inputs are all known, once, in one forward sweep.

:func:`fold_constants` is the sweep fold-constants runs after shape inference
and pin-static-shapes runs between its own rounds of inference; the kernels
that evaluate a node are in :mod:`passes.fold_kernels`. What folds and what
never does is described in :mod:`passes.fold_constants`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from passes.constants import MAX_FOLD_BYTES
from passes.fold_kernels import Decline, ints, run_kernel, slices
from passes.shapes import is_static
from qgraph.ir.graph import Constant, Graph, Node, Tensor

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
            sl = slices(1, ints(ins[1]), ints(ins[2]), ints(ins[3]) if len(ins) > 3 else [0],
                         ints(ins[4]) if len(ins) > 4 else [1])  # fmt: skip
        except Decline:
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
    results = run_kernel(node, ins, opset)
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
