"""Raising a graph's opset for a fused op that is newer than the graph (:class:`OpsetFusionPass`).

Only what changed meaning between the graph's opset and the target is touched:
from opset 13 on, raising across 18 moves the ``axes`` attribute of
ReduceMean/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare into an input and gives
a Split without a ``split`` input its ``num_outputs`` attribute; a graph below
opset 13 (Softmax, Squeeze, Unsqueeze, Split and ReduceSum all changed at 13)
and a graph with DFT, GridSample or GroupNormalization across their breaking
versions is declined with a reason. The opset is raised only when something is
fused.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np

from passes.const_values import default_domain
from qgraph.ir.graph import Graph, Node
from qgraph.pipeline.fusion import FusionPass, M
from qgraph.pipeline.manager import PassResult

log = logging.getLogger(__name__)

#: Reduce ops whose ``axes`` attribute became an input at opset 18 (ReduceSum moved at 13).
REDUCE_AXES_INPUT_AT_18 = frozenset(
    {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
)
#: Ops whose meaning changed at the given opset in a way this module does not convert.
UNCONVERTED_CHANGES = {"DFT": 20, "GridSample": 20, "GroupNormalization": 21}


def all_nodes(graph: Graph) -> list[Node]:
    """Every node of the graph and of its subgraphs (If/Loop/Scan bodies)."""
    graph_type = type(graph.gs)
    out: list[Node] = []
    todo = list(graph.nodes)
    while todo:
        node = todo.pop()
        out.append(node)
        for v in node.attrs.values():
            subgraphs = v if isinstance(v, list) else [v]
            for sg in subgraphs:
                if isinstance(sg, graph_type):
                    todo.extend(sg.nodes)
    return out


def opset_upgrade_problem(graph: Graph, target: int, op: str) -> str | None:
    """Why the graph's opset cannot be raised to ``target`` for ``op``, or None."""
    current = graph.opset() or 1
    if current >= target:
        return None
    if current < 13:
        return (
            f"{op} needs opset {target} but the graph is at opset {current}; below 13 raising it would change other ops "
            "(Softmax, Squeeze, Unsqueeze, Split, ReduceSum): convert the model to opset 13 or newer first"
        )
    for node in all_nodes(graph):
        since = UNCONVERTED_CHANGES.get(node.op)
        if since is not None and default_domain(node) and current < since <= target:
            return f"{op} needs opset {target}, and raising opset {current} would change {node.op} '{node.name}' (changed at opset {since})"
    return None


def raise_opset(graph: Graph, target: int, prefix: str) -> None:
    """Raise the default opset to ``target``, converting the nodes whose signature changed."""
    current = graph.opset() or 1
    if current >= target:
        return
    converted = 0
    if current < 18 <= target:
        for node in all_nodes(graph):
            if not default_domain(node):
                continue
            if node.op in REDUCE_AXES_INPUT_AT_18 and "axes" in node.attrs:
                axes = np.asarray(list(node.attrs.pop("axes")), dtype=np.int64)
                node.inputs.append(graph.constant(prefix, axes))
                converted += 1
            elif node.op == "Split" and (len(node.inputs) < 2 or not node.inputs[1].name) and "num_outputs" not in node.attrs:
                node.attrs["num_outputs"] = len(node.outputs)
                converted += 1
    graph.set_opset(target)
    log.info("%s: raised the opset from %d to %d (%d nodes converted)", prefix, current, target, converted)


class OpsetFusionPass(FusionPass[M]):
    """A fusion whose fused op needs ``min_opset``: raised once something is fused.

    If the opset cannot be raised safely, every otherwise good match is
    declined with the reason (``opset_problem``, set by :meth:`run`).
    """

    min_opset: ClassVar[int] = 1
    fused_op: ClassVar[str] = ""

    def __init__(self, max_matches: int | None = None) -> None:
        super().__init__(max_matches)
        self.opset_problem: str | None = None

    def run(self, graph: Graph) -> PassResult:
        self.opset_problem = opset_upgrade_problem(graph, self.min_opset, self.fused_op)
        return super().run(graph)

    def prepare(self, graph: Graph) -> None:
        raise_opset(graph, self.min_opset, self.name)
