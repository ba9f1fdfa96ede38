"""Stage dumps: a graph as ONNX text without its weights, and what a pass changed by op type."""

from __future__ import annotations

import collections
import copy
from collections.abc import Iterable

import onnx
from onnx import TensorProto, helper

from qgraph.devtools.golden import MAX_INLINE
from qgraph.ir.graph import Graph


def _numel(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def weightless_text(graph: Graph) -> str:
    """The graph as ONNX text, names kept, without weights.

    Initializers and Constant nodes with more than ``MAX_INLINE`` elements (and
    every external initializer) become typed graph inputs; no external weight
    is read.
    """
    model = graph.to_proto()
    g = model.graph
    keep, big = [], []
    for t in g.initializer:
        if t.data_location == TensorProto.EXTERNAL or _numel(t.dims) > MAX_INLINE:
            big.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = []
    for n in g.node:
        value = next((a.t for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and value is not None and _numel(value.dims) > MAX_INLINE:
            big.append(helper.make_tensor_value_info(n.output[0], value.data_type, list(value.dims)))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    g.input.extend(big)
    return onnx.printer.to_text(model).rstrip() + "\n"


def node_keys(graph: Graph) -> collections.Counter[tuple[str, str]]:
    """Each node as (op, name), counted: survives passes that re-import the graph (new node objects)."""
    return collections.Counter((n.op, n.name or "") for n in graph.nodes)


def op_changes(
    before: collections.Counter[tuple[str, str]], after: collections.Counter[tuple[str, str]]
) -> tuple[dict[str, int], dict[str, int]]:
    """Nodes added and removed, counted by op type."""
    added: collections.Counter[str] = collections.Counter()
    removed: collections.Counter[str] = collections.Counter()
    for (op, _), n in (after - before).items():
        added[op] += n
    for (op, _), n in (before - after).items():
        removed[op] += n
    return dict(sorted(added.items())), dict(sorted(removed.items()))


def copy_graph(graph: Graph) -> Graph:
    """An independent copy (weights shared, lazy); opset imports are not shared."""
    c = graph.copy()
    c.gs.import_domains = copy.deepcopy(graph.gs.import_domains)
    return c
