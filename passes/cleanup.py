"""Cleanup: drop dead nodes and tensors, then sort the nodes topologically.

This is the one stage that calls onnx-graphsurgeon's cleanup/toposort; rewrite
passes leave dead nodes behind and rely on it.
"""

from __future__ import annotations

from qgraph.ir.graph import Graph
from qgraph.pipeline.manager import Pass, PassResult


class Cleanup(Pass):
    name = "cleanup"
    produces = ("toposorted", "no_dead_nodes")

    def run(self, graph: Graph) -> PassResult:
        before = [id(n) for n in graph.nodes]
        graph.cleanup()
        after = [id(n) for n in graph.nodes]
        alive = set(after)
        removed = len(before) - len(after)
        # Changed if a node died or the survivors moved.
        modified = removed > 0 or after != [i for i in before if i in alive]
        return PassResult(graph, modified, {"removed": removed} if removed else {})
