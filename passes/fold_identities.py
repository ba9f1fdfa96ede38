"""Fold the ops a pinned graph's static shapes make identities or constants (after the target's final passes).

retain-kv-cache writes one graph for any number of new tokens per row. It finds each row's last position
(``ReduceMax`` over the sequence), selects that position's hidden state before the vocabulary projection
(``Equal``, ``Cast``, ``Unsqueeze``: a one-hot row; ``MatMul`` by it) and sends padding to the row's last
position (``GreaterOrEqual``, ``Where``). A decode step has one token per row, and there every one of these
is an identity; seven kernels of a Llama decode step, about 0.05 ms of 3 under int4 (PERFORMANCE.md). The rules,
on default-domain ops whose shapes are static:

* ``ReduceMax``/``ReduceMin``/``ReduceSum``/``ReduceMean``/``ReduceProd`` whose output has its input's shape
  reduced axes of size 1 only (or none): it is its input.
* a comparison of an integer or bool tensor with itself is a constant (``Equal``, ``LessOrEqual``,
  ``GreaterOrEqual`` true; ``Less``, ``Greater`` false). Not floats: NaN is not equal to itself.
* ``Where(c, x, x)`` is ``x`` when its output has ``x``'s shape.
* ``MatMul(ones, x)`` or ``MatMul(x, ones)`` with a constant of ones whose matrices are 1x1, when the product has
  ``x``'s shape, is ``x`` (one product by 1.0 per element: exact).
* ``Reshape`` of a ``Reshape``, ``Unsqueeze``, ``Squeeze`` or ``Flatten`` reads that op's input (all four keep the
  elements in order): fuse-decode-attention's sequence lengths are ``Reshape(Unsqueeze(...))``.

The constants the rules make are folded (fold-constants' sweep) and the rules run again until nothing changes.
A graph output is never bypassed. At prefill (many tokens per row) nothing here applies to retain-kv-cache's
nodes, and the pass leaves them.
"""

from __future__ import annotations

import logging

import numpy as np

from passes.folding import fold_constants
from passes.matching import bypass
from passes.shapes import RESHAPE_LIKE, read_through, static_dims
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.ir.validate import is_onnx_op
from qgraph.pipeline.manager import Pass, PassResult

log = logging.getLogger(__name__)

_REDUCE = ("ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceProd")
#: A comparison of a value with itself.
_SELF_COMPARE = {"Equal": True, "LessOrEqual": True, "GreaterOrEqual": True, "Less": False, "Greater": False}
#: Sweeps before giving up on a fixed point (each sweep plus folding settles a chain; two suffice for retain-kv-cache's).
_MAX_SWEEPS = 4


def _shape(t: Tensor) -> list[int] | None:
    return static_dims(t.shape)


class FoldIdentities(Pass):
    """Bypass or fold ops that static shapes make identities or constants (see the module docstring)."""

    name = "fold-identities"
    requires = ("static_shapes",)
    produces = ("identities_folded",)
    invalidates = ("no_dead_nodes",)

    def run(self, graph: Graph) -> PassResult:
        ops = {*_REDUCE, *_SELF_COMPARE, "Where", "MatMul", "Reshape"}
        graph.infer_shapes_if_missing((t for n in graph.nodes if n.op in ops for t in (*n.inputs, *n.outputs) if t.name), self.name)
        stats: dict[str, int] = {}
        for _ in range(_MAX_SWEEPS):
            changed = self._sweep(graph, stats)
            if not changed:
                break
            folded = fold_constants(graph, self.name).get("folded", 0)
            if folded:
                stats["folded"] = stats.get("folded", 0) + folded
        log.info("%s: %s", self.name, stats or "nothing to fold")
        return PassResult(graph, bool(stats), stats)

    def _sweep(self, graph: Graph, stats: dict[str, int]) -> int:
        changed = 0
        for node in list(graph.nodes):
            if not node.outputs or not node.inputs:
                continue  # removed earlier in this sweep
            key = self._rule(graph, node)
            if key is not None:
                stats[key] = stats.get(key, 0) + 1
                changed += 1
        return changed

    def _rule(self, graph: Graph, node: Node) -> str | None:
        """Apply the first rule that holds for ``node``; its stat key, or None."""
        out = node.outputs[0]
        if is_onnx_op(node, *_REDUCE) and self._unit_reduce(node):
            return "reduce" if bypass(graph, node, node.inputs[0]) else None
        if is_onnx_op(node, *_SELF_COMPARE) and self._self_compare(node):
            shape = _shape(out)
            if shape is None or graph.is_graph_output(out):
                return None
            bypass(graph, node, graph.constant(self.name, np.full(shape, _SELF_COMPARE[node.op], bool)))
            return "self_compare"
        if is_onnx_op(node, "Where") and len(node.inputs) == 3 and node.inputs[1] is node.inputs[2]:
            x = node.inputs[1]
            if _shape(out) is not None and _shape(out) == _shape(x):
                return "where_same" if bypass(graph, node, x) else None
        if is_onnx_op(node, "MatMul") and (x := self._unit_product(graph, node)) is not None:
            return "matmul_by_one" if bypass(graph, node, x) else None
        if is_onnx_op(node, "Reshape") and len(node.inputs) == 2 and read_through(graph, node, self.name, RESHAPE_LIKE):
            return "reshape_merged"
        return None

    @staticmethod
    def _unit_reduce(node: Node) -> bool:
        """A reduction whose output has its input's shape reduced only axes of size 1 (kept or dropped), or none:
        each output element is one input element."""
        src = _shape(node.inputs[0])
        return src is not None and src == _shape(node.outputs[0])

    @staticmethod
    def _self_compare(node: Node) -> bool:
        a = node.inputs[0]
        if len(node.inputs) != 2 or node.inputs[1] is not a or a.dtype is None:
            return False
        return np.dtype(a.dtype).kind in "iub"

    @staticmethod
    def _unit_product(graph: Graph, node: Node) -> Tensor | None:
        """The operand ``x`` of ``MatMul(ones, x)`` or ``MatMul(x, ones)`` (1x1 matrices of ones) when the product has x's shape."""
        if len(node.inputs) != 2:
            return None
        out = _shape(node.outputs[0])
        for ones, x in (node.inputs, node.inputs[::-1]):
            if not graph.is_constant(ones) or out is None or out != _shape(x):
                continue
            value = graph.const_value(ones)
            if value is not None and value.ndim >= 2 and value.shape[-2:] == (1, 1) and bool(np.all(value == 1)):
                return x
        return None
