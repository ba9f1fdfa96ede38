"""Legalize for QNN HTP: rewrite the few ops the HTP backend rejects into ones it takes.

What the QNN EP (onnxruntime-qnn 2.7.0, QNN SDK 2.51, HTP simulator) was
measured to take and to reject, op by op and on the pinned graphs of tiny
random GPT-2 exports (dynamo and TorchScript, opsets 14 to 20):

* the retained-state, pinned graph that ``optimize(graph, ctx_len=C,
  batch_size=B, seq_len=S)`` makes is taken whole: int64 ``input_ids`` and
  ``position_ids`` at the boundary (the EP narrows int64 to int32 itself),
  int64 ``ReduceMax``/``ArgMax``/``Where``/comparisons, ``GatherElements``,
  ``ScatterND`` (duplicate indices included), the one-hot ``MatMul``,
  ``LayerNormalization``, ``Gelu`` (tanh and erf), ``IsNaN``, ``Gather`` with
  index -1. On that graph this pass changes nothing. The same holds for
  dynamo's opset-23 and -24 exports: retain-kv-cache gives their ``Attention``
  ops the additive float position mask [B, 1, S, C], which the HTP takes;
* rejected, and rewritten here:

  - ``GatherND``: rejected on bool data (Hugging Face's padding-mask lookup,
    left in a pinned graph that keeps its concat-grown cache), and on any
    type when its indices have rank 5 (float: placed on the CPU; int32: taken,
    then the HTP fails to finalize with QNN_COMMON_ERROR_MEM_ALLOC). With
    constant indices and a static data shape it becomes a ``Gather`` (which
    the HTP takes for bool too) on the data with its indexed dims flattened::

        # GatherND(x, I) -> Gather(Reshape(x, [d0*...*d(k-1), dk, ...]), sum_j I[..., j]*stride_j)   exact

    Bool data with indices that are not constant gathers int32 instead::

        # GatherND(b, i) -> Cast(GatherND(Cast(b, int32), i), bool)   exact

  - opset-23 ``Attention`` with a bool mask (``True`` = may attend)::

        # Attention(q, k, v, m) -> Attention(q, k, v, Where(m, 0, -10000))
        # exact wherever a query sees at least one key; a query that sees none
        # gets the mean of the values instead of the bool form's NaN

  - a ``Concat`` operand with no elements along the axis (Phi-3's partial rotary
    exported by TorchScript: ``cat(rotated, q[..., head_dim:])`` with nothing
    left to pass; the empty Slice is placed on the CPU) is dropped::

        # Concat(a, e, b) -> Concat(a, b) where e has 0 elements along the axis   exact

* rejected and not rewritten (no pinned graph of ours has them):
  ``Range`` with inputs that are not constant (its length depends on data,
  so no static target takes it; fold-constants folds the constant case),
  ``Trilu`` (folded when its input is constant), ``TensorScatter`` (opset 24).
  Compiling a graph with one of them raises
  :class:`~qgraph.errors.PlacementError` naming the node.

The graph's inputs and outputs are never changed.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from passes.constants import MASK_VALUE
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.pipeline.manager import Pass, PassResult

log = logging.getLogger(__name__)

#: ONNX TensorProto data types used below.
_INT32, _BOOL = 6, 9
# Ops whose output is bool whatever their inputs are.
_BOOL_OPS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not", "IsNaN", "IsInf"}


def _dtype(t: Tensor) -> np.dtype | None:
    """The element type of ``t``: its own, or what its producer makes (Cast, compares)."""
    if t.dtype is not None:
        try:
            return np.dtype(t.dtype)
        except TypeError:
            return None
    p = t.inputs[0] if t.inputs else None
    if p is None:
        return None
    if p.op == "Cast" and "to" in p.attrs:
        from onnx import helper

        return np.dtype(helper.tensor_dtype_to_np_dtype(int(p.attrs["to"])))
    if p.op in _BOOL_OPS:
        return np.dtype(bool)
    return None


class LegalizeQnn(Pass):
    """Rewrite what QNN HTP rejects (see the module docstring for the measured list)."""

    name = "legalize-qnn"
    produces = ("qnn_legal",)

    def __init__(self) -> None:
        self.declined: list[str] = []

    def run(self, graph: Graph) -> PassResult:
        self.declined = []
        if any(self._unknown(n) for n in graph.nodes):
            graph.infer_shapes()  # element types and shapes decide what is rewritten
        stats: dict[str, Any] = {"gathernd_to_gather": 0, "gathernd_bool": 0, "attention_bool_mask": 0, "empty_concat_operands": 0}
        for node in graph.nodes:
            if node.domain not in ("", "ai.onnx", None):
                continue  # a custom op that shares a name with an ONNX op is left alone
            if node.op == "GatherND":
                reason = self._gathernd_to_gather(graph, node)
                if reason is None:
                    stats["gathernd_to_gather"] += 1
                elif _dtype(node.inputs[0]) == np.bool_:
                    self._gathernd_bool(graph, node)
                    stats["gathernd_bool"] += 1
                elif reason:
                    self.declined.append(f"GatherND {node.name}: {reason}")
            elif node.op == "Concat":
                stats["empty_concat_operands"] += self._drop_empty_operands(node)
            elif node.op == "Attention" and len(node.inputs) > 3 and node.inputs[3].name and _dtype(node.inputs[3]) == np.bool_:
                if self._attention_bool_mask(graph, node):
                    stats["attention_bool_mask"] += 1
        stats = {k: v for k, v in stats.items() if v}
        if self.declined:
            stats["declined"] = len(self.declined)
        return PassResult(graph, any(k != "declined" for k in stats), stats)

    @staticmethod
    def _unknown(node: Node) -> bool:
        if node.op == "GatherND":
            data = node.inputs[0]
            return _dtype(data) is None or data.shape is None or not all(isinstance(d, int) for d in data.shape)
        if node.op == "Concat":
            return any(t.shape is None for t in node.inputs)
        if node.op == "Attention":
            return len(node.inputs) > 3 and bool(node.inputs[3].name) and (_dtype(node.inputs[3]) is None or _dtype(node.inputs[0]) is None)
        return False

    @staticmethod
    def _drop_empty_operands(node: Node) -> int:
        # Concat(a, e, b) -> Concat(a, b): e adds nothing along the axis (one operand always stays)
        rank = len(node.inputs[0].shape) if node.inputs and node.inputs[0].shape is not None else None
        if rank is None:
            return 0
        axis = int(node.attrs.get("axis", 0)) % rank
        empty = [t for t in node.inputs if t.shape is not None and len(t.shape) == rank and t.shape[axis] == 0]
        if not empty or len(empty) == len(node.inputs):
            return 0
        for i in reversed(range(len(node.inputs))):
            if any(node.inputs[i] is e for e in empty):
                node.inputs.pop(i)  # graphsurgeon's list unlinks the consumer
        log.debug("legalize-qnn: Concat %s drops %d empty operands", node.name, len(empty))
        return len(empty)

    def _gathernd_to_gather(self, graph: Graph, node: Node) -> str | None:
        """Rewrite to Gather; None when done, else why not ("" for run-time indices, which need no reason)."""
        # GatherND(x, I) -> Gather(Reshape(x, [d0*...*d(k-1), dk, ...]), sum_j I[..., j]*stride_j), axis 0.
        data, indices = node.inputs[0], node.inputs[1]
        idx = graph.const_value(indices)
        shape = list(data.shape) if data.shape is not None else None
        if int(node.attrs.get("batch_dims", 0)) != 0:
            return "batch_dims is not 0"
        if idx is None or idx.ndim < 1:
            return ""  # indices computed at run time: only bool data needs a rewrite (_gathernd_bool)
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            return f"the data shape {shape} is not static"
        k = int(idx.shape[-1])
        if not 1 <= k <= len(shape):
            return f"indices pick {k} dims of rank-{len(shape)} data"
        dims = np.asarray(shape[:k], np.int64)
        if np.any(idx < -dims) or np.any(idx >= dims):
            return "a constant index is out of range"
        strides = np.asarray([int(np.prod(dims[j + 1 :])) for j in range(k)], np.int64)  # row-major
        flat = ((idx.astype(np.int64) % dims) * strides).sum(axis=-1).astype(np.int64)
        rows = int(np.prod(dims))
        if k > 1:
            new_shape = graph.constant(self.name, np.asarray([rows, *shape[k:]], np.int64))
            flat_data = graph.variable(self.name, data.dtype, [rows, *shape[k:]])
            data = graph.add_node("Reshape", [data, new_shape], [flat_data], prefix=self.name, before=node).outputs[0]
        out = node.outputs[0]
        node.outputs.clear()  # ``out`` is the Gather's now
        gather = graph.add_node("Gather", [data, graph.constant(self.name, flat)], [out], {"axis": 0}, prefix=self.name, before=node)
        graph.remove_nodes([node])
        log.debug("legalize-qnn: GatherND %s -> %s", node.name, gather.name)
        return None

    def _gathernd_bool(self, graph: Graph, node: Node) -> None:
        # GatherND(b, i) -> Cast(GatherND(Cast(b, int32), i), bool): a pure data move, exact.
        data = node.inputs[0]
        values = graph.const_value(data)
        if values is not None:
            node.inputs[0] = graph.constant(self.name, values.astype(np.int32))
        else:
            node.inputs[0] = graph.add_node("Cast", [data], [graph.variable(self.name, np.int32, data.shape)], {"to": _INT32},
                                            prefix=self.name, before=node).outputs[0]  # fmt: skip
        out = node.outputs[0]
        gathered = graph.variable(self.name, np.int32, out.shape)
        node.outputs[0] = gathered  # synchronized: ``out`` loses its producer, ``gathered`` gains it
        graph.add_node("Cast", [gathered], [out], {"to": _BOOL}, prefix=self.name, after=node)
        log.debug("legalize-qnn: GatherND %s on bool data now gathers int32", node.name)

    def _attention_bool_mask(self, graph: Graph, node: Node) -> bool:
        # Attention(q, k, v, m) -> Attention(q, k, v, Where(m, 0, MASK_VALUE)); True = may attend.
        dtype = _dtype(node.inputs[0])
        if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            self.declined.append(f"Attention {node.name}: the query's type is {dtype}, so the float mask's type is unknown")
            return False
        mask = node.inputs[3]
        zero = graph.constant(self.name, np.zeros((), dtype))
        low = graph.constant(self.name, np.full((), MASK_VALUE, dtype))
        node.inputs[3] = graph.add_node("Where", [mask, zero, low], [graph.variable(self.name, dtype, mask.shape)],
                                        prefix=self.name, before=node).outputs[0]  # fmt: skip
        log.debug("legalize-qnn: Attention %s takes an additive float mask", node.name)
        return True
