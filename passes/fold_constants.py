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
:data:`passes.fold_kernels.KERNELS`; any other default-domain op falls back to
``onnx.reference.ReferenceEvaluator`` on that one node. Never folded: nodes
with subgraphs, ops from other domains, random ops, and anything whose
constant inputs or result exceed :data:`MAX_FOLD_BYTES` (1 MiB), so large
weights stay lazy and external instead of being materialized (a ``Transpose``
of a 100 MB weight stays a ``Transpose``).

Folded results are new initializers ``fold-constants/<n>``; a folded graph
output keeps its name and is produced by a ``Constant`` node instead.
:func:`passes.folding.fold_constants` is the sweep without shape inference,
for passes that run inference themselves (``pin-static-shapes``).
"""

from __future__ import annotations

import logging

from passes.constants import MAX_FOLD_BYTES
from passes.folding import fold_constants
from qgraph.errors import GraphCheckError
from qgraph.ir.graph import Graph
from qgraph.pipeline.manager import Pass, PassResult

log = logging.getLogger(__name__)


class FoldConstants(Pass):
    """Evaluate constant subgraphs and static ``Shape``/``Size`` ahead of time.

    ``infer_shapes`` (default True) runs ONNX shape inference first, so that
    every ``Shape`` of a statically shaped tensor folds; ``max_bytes`` bounds
    the size of any constant input or result that is folded.
    """

    name = "fold-constants"
    produces = ("constants_folded",)
    invalidates = ("no_dead_nodes",)

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
