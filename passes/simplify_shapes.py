"""Simplify layout ops that static shapes make trivial (run after pin-static-shapes).

With every shape pinned, some layout ops do nothing or can be merged, and each
costs a kernel launch (about 5-10 us on ONNX Runtime's CPU provider, more on an
accelerator's queue). At gpt2-small decode this pass removes 24
``GatherElements`` and turns 24 ``Transpose`` into merged ``Reshape``s
(PERFORMANCE.md). The rules, each needing the static shapes it reads:

* ``GatherElements(data, indices, axis)`` whose gathered axis has size 1 and
  whose indices have the data's shape is the data itself: the only valid index
  on a size-1 axis is 0 (or -1). retain-kv-cache's gather of the valid new
  tokens is this at decode (one token).
* a ``Transpose`` that only moves size-1 axes keeps the elements in order: it
  becomes a ``Reshape`` to its output shape.
* ``Reshape(Reshape(x))`` reads ``x`` directly, with the outer output shape.
* a ``Reshape``, ``Expand`` or ``Identity`` whose output has its input's shape
  (and is not a graph output) is removed.

Custom-domain ops named like these are left alone.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from passes.fold_constants import static_dims
from qgraph.graph import Graph, Node, Tensor
from qgraph.pass_manager import Pass, PassResult
from qgraph.validate import is_onnx_op

log = logging.getLogger(__name__)

#: The ops this pass looks at.
_OPS = frozenset({"GatherElements", "Transpose", "Reshape", "Expand", "Identity"})


def _static(t: Tensor) -> list[int] | None:
    return static_dims(t.shape)


def _keeps_order(perm: list[int], shape: list[int]) -> bool:
    """True if transposing ``shape`` by ``perm`` keeps the non-unit axes in order (a reshape)."""
    moved = [p for p in perm if shape[p] != 1]
    return moved == sorted(moved)


class SimplifyShapes(Pass):
    """Drop or merge layout ops that static shapes make trivial (see the module docstring)."""

    name = "simplify-shapes"

    def run(self, graph: Graph) -> PassResult:
        # Pinned graphs carry their shapes; a graph without value_info gets them inferred once.
        if any(n.op in _OPS and n.outputs and n.outputs[0].shape is None for n in graph.nodes):
            if (problem := graph.try_infer_shapes()) is not None:
                log.info("%s: %s; ops without static shapes are left", self.name, problem)
        stats: dict[str, int] = {}

        def count(key: str) -> None:
            stats[key] = stats.get(key, 0) + 1

        for node in list(graph.nodes):
            if not node.outputs or not node.inputs:
                continue  # removed earlier in this sweep
            out = node.outputs[0]
            if is_onnx_op(node, "GatherElements") and self._unit_gather(node):
                if self._bypass(graph, node, node.inputs[0]):
                    count("gather_elements")
            elif is_onnx_op(node, "Transpose") and self._unit_transpose(node):
                shape = _static(out)
                assert shape is not None
                node.op = "Reshape"
                node.attrs = {}
                node.inputs.append(graph.constant(self.name, np.array(shape, np.int64)))
                count("transpose_to_reshape")
                self._merge_reshape(graph, node, count)
            elif is_onnx_op(node, "Reshape"):
                self._merge_reshape(graph, node, count)
            elif is_onnx_op(node, "Expand", "Identity"):
                shape = _static(out)
                if shape is not None and shape == _static(node.inputs[0]) and self._bypass(graph, node, node.inputs[0]):
                    count(node.op.lower())
        log.info("%s: %s", self.name, stats or "nothing to simplify")
        return PassResult(graph, bool(stats), stats)

    @staticmethod
    def _unit_gather(node: Node) -> bool:
        data, indices = node.inputs[0], node.inputs[1]
        shape = _static(data)
        if shape is None or not shape or shape != _static(indices) or shape != _static(node.outputs[0]):
            return False
        axis = int(node.attrs.get("axis", 0))
        axis = axis + len(shape) if axis < 0 else axis
        return 0 <= axis < len(shape) and shape[axis] == 1

    @staticmethod
    def _unit_transpose(node: Node) -> bool:
        shape = _static(node.inputs[0])
        if shape is None or _static(node.outputs[0]) is None:
            return False
        perm: Any = node.attrs.get("perm")
        perm = list(range(len(shape)))[::-1] if perm is None else [int(p) for p in perm]
        return len(perm) == len(shape) and _keeps_order(perm, shape)

    def _merge_reshape(self, graph: Graph, node: Node, count: Any) -> None:
        """Reshape(Reshape(x)) -> Reshape(x, static shape); a Reshape to its own input's shape is removed."""
        shape = _static(node.outputs[0])
        if shape is None:
            return
        inner = graph.producer(node.inputs[0])
        if is_onnx_op(inner, "Reshape"):
            node.inputs[0] = inner.inputs[0]
            node.inputs[1] = graph.constant(self.name, np.array(shape, np.int64))
            if "allowzero" in node.attrs:
                del node.attrs["allowzero"]
            count("reshape_merged")
        if shape == _static(node.inputs[0]) and self._bypass(graph, node, node.inputs[0]):
            count("reshape_removed")

    @staticmethod
    def _bypass(graph: Graph, node: Node, source: Tensor) -> bool:
        """Make the consumers of ``node``'s output read ``source``; False for a graph output (kept)."""
        out = node.outputs[0]
        if graph.is_graph_output(out):
            return False
        graph.replace_uses(out, source)
        graph.remove_nodes([node])
        return True
