"""Pack the linear layers that read one input into one MatMul: a Llama layer's q/k/v projections, its gate and up.

    q = MatMul(x, Wq)                        y = MatMul(x, concat(Wq, Wk, Wv, axis=1))
    k = MatMul(x, Wk)              ->        q, k, v = Split(y, [Nq, Nk, Nv], axis=-1)
    v = MatMul(x, Wv)

A decode step streams every weight once whatever the packing, so the bytes are
the same; what goes is a kernel call per projection (two of three q/k/v calls,
one of two gate/up calls per layer): each is a thread-pool dispatch over a
small output (a 4-KV-head k projection is [1, 768] x [768, 256]), and under
int4 (quantize-weights runs after it, on the packed weight) the weight's read
is short enough for the calls' fixed cost to show. onnxruntime-genai's builder
writes Llama's q/k/v and gate/up packed for the same reason. GPT-2's exporters
pack its attention already (one ``c_attn``), and its MLP is not gated: nothing
to do there.

When the parts are read by one Concat alone, in order, on the last axis (a decode step's q, k and v that
fuse-attention-rotary feeds GroupQueryAttention packed), the packed product is that Concat: no Split is made.

What it packs: standard-domain ``MatMul`` nodes that read the same input as
their first operand and a 2-D float32 constant as their second, with the same
K. A group of one is left alone (nothing to pack). Beside a linear layer, a
``MatMul`` of the same input whose weight is a graph input, computed at run
time, not float32 or not 2-D is a near miss with that reason (one where no
linear layer reads the input, such as attention's products, is not looked
at). Running it twice changes nothing: a packed input has one reader left.
"""

from __future__ import annotations

import logging

import numpy as np

from passes.const_values import dtype_and_shape
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.ir.validate import is_onnx_op
from qgraph.pipeline.fusion import NearMiss
from qgraph.pipeline.manager import Pass, PassResult

log = logging.getLogger(__name__)


class PackMatmuls(Pass):
    """MatMuls of one input by constant weights -> one MatMul by their concatenation, then a Split (module docstring)."""

    name = "pack-matmuls"
    produces = ("matmuls_packed",)
    invalidates = ("no_dead_nodes",)

    def __init__(self) -> None:
        self.near_misses: list[NearMiss] = []

    def run(self, graph: Graph) -> PassResult:
        self.near_misses = []
        groups: dict[int, list[tuple[Node, list[int] | str]]] = {}
        for node in graph.nodes:
            if is_onnx_op(node, "MatMul") and len(node.inputs) == 2 and len(node.outputs) == 1:
                groups.setdefault(id(node.inputs[0]), []).append((node, self._weight_shape(graph, node)))
        stats: dict[str, int] = {}
        for group in groups.values():
            weights = [(n, shape) for n, shape in group if not isinstance(shape, str)]
            if not weights:
                continue  # attention's products and the like: no linear layer reads this input
            for node, why in group:
                if isinstance(why, str):  # beside a linear layer, a product that is not one
                    self.near_misses.append(NearMiss(node.name, node.op, why))
            by_k: dict[int, list[Node]] = {}
            for node, shape in weights:
                by_k.setdefault(shape[0], []).append(node)
            for same in by_k.values():
                if len(same) > 1:
                    if self._pack(graph, same):
                        stats["concat_dropped"] = stats.get("concat_dropped", 0) + 1
                    stats["packed"] = stats.get("packed", 0) + 1
                    stats["matmuls"] = stats.get("matmuls", 0) + len(same)
        if self.near_misses:
            stats["declined"] = len(self.near_misses)
        log.info("%s: %s", self.name, stats or "nothing to pack")
        return PassResult(graph, bool(stats.get("packed")), stats)

    @staticmethod
    def _weight_shape(graph: Graph, node: Node) -> list[int] | str:
        """The [K, N] of a linear-layer MatMul's 2-D float32 constant weight (from its header: only packed weights are
        read), else why it is not one."""
        w = node.inputs[1]
        if any(t is w for t in graph.inputs):
            return f"the weight '{w.name}' is a graph input, not a constant"
        if not graph.is_constant(w):
            return f"the weight '{w.name}' is computed at run time"
        dtype, shape = dtype_and_shape(graph, w)
        if dtype != np.float32:
            return f"the weight '{w.name}' is not float32"
        if len(shape) != 2:
            return f"the weight '{w.name}' has shape {shape}, not 2-D"
        return shape

    def _pack(self, graph: Graph, group: list[Node]) -> bool:
        """Pack ``group``; True when the packed product replaced a Concat of its parts (no Split made)."""
        first = group[0]
        x = first.inputs[0]
        weights = [graph.const_value(n.inputs[1]) for n in group]
        widths = [int(w.shape[1]) for w in weights]
        weight = graph.constant(self.name, np.ascontiguousarray(np.concatenate(weights, axis=1)))
        outs = [n.outputs[0] for n in group]
        shape = list(outs[0].shape) if outs[0].shape is not None else None
        packed = graph.variable(self.name, outs[0].dtype, [*shape[:-1], sum(widths)] if shape else None)
        concat = self._concat_of(graph, outs)
        graph.remove_nodes(group)  # detached first: each output gets the Split as its one producer
        graph.add_node("MatMul", [x, weight], [packed], prefix=self.name, before=first)
        if concat is not None:  # Concat(q, k, v) of the parts in order (fuse-attention-rotary's): the packed product itself
            graph.replace_uses(concat.outputs[0], packed)
            graph.remove_nodes([concat])
            return True
        split = graph.constant(self.name, np.asarray(widths, np.int64))
        graph.add_node("Split", [packed, split], outs, {"axis": -1}, prefix=self.name, before=first)
        return False

    @staticmethod
    def _concat_of(graph: Graph, outs: list[Tensor]) -> Node | None:
        """The Concat on the last axis that is the only reader of ``outs`` and reads them alone, in order, if any."""
        readers = [n for o in outs for n in graph.consumers(o)]
        cat = readers[0] if readers else None
        if (not is_onnx_op(cat, "Concat") or any(r is not cat for r in readers) or len(readers) != len(outs)
                or [id(t) for t in cat.inputs] != [id(o) for o in outs] or any(graph.is_graph_output(o) for o in outs)
                or graph.is_graph_output(cat.outputs[0])):  # fmt: skip
            return None
        axis = int(cat.attrs.get("axis", 0))
        return cat if axis == -1 or (outs[0].shape is not None and axis == len(outs[0].shape) - 1) else None
