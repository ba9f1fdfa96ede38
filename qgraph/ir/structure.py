"""The graph's structure: live nodes, a stable topological order, and what is wrong with it.

The cleanup stage (:meth:`qgraph.ir.graph.Graph.cleanup`) keeps the live
nodes (:func:`live_nodes`) in a stable topological order (:func:`toposorted`);
:meth:`~qgraph.ir.graph.Graph.check` reports the problems with order, names
and edges (:func:`structure_problems`), then runs the ONNX checks
(:func:`onnx_checks`). These work on onnx-graphsurgeon graphs and
ModelProtos, never on a :class:`~qgraph.ir.graph.Graph`, so this module sits
below the graph core.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Iterable

import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from qgraph.errors import GraphCheckError


def live_node_ids(outputs: Iterable[gs.Tensor]) -> set[int]:
    """ids of the nodes that ``outputs`` depend on (walking producers backwards)."""
    live: set[int] = set()
    seen: set[int] = set()
    stack = list(outputs)
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        for node in t.inputs:
            if id(node) not in live:
                live.add(id(node))
                stack.extend(node.inputs)
    return live


def live_nodes(g: gs.Graph) -> list[gs.Node]:
    """The nodes some graph output depends on, in their current order; the rest are detached."""
    live = live_node_ids(g.outputs)
    keep = []
    for n in g.nodes:
        if id(n) in live:
            keep.append(n)
        else:
            n.inputs.clear()
            n.outputs.clear()
    return keep


def toposorted(nodes: list[gs.Node]) -> list[gs.Node]:
    """Kahn's algorithm; ties keep the current order, so a sorted graph is unchanged."""
    index = {id(n): i for i, n in enumerate(nodes)}
    deps = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        producers = {index[id(p)] for t in n.inputs for p in t.inputs if id(p) in index and index[id(p)] != i}
        deps[i] = len(producers)
        for j in producers:
            users[j].append(i)
    ready = [i for i, d in enumerate(deps) if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            deps[u] -= 1
            if deps[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise GraphCheckError("the graph has a cycle; no topological order exists")
    return order


def structure_problems(g: gs.Graph) -> list[str]:
    """Problems with order, names and edges, without running the checker."""
    problems: list[str] = []
    available = {t.name for t in g.inputs}
    available |= {t.name for t in g.tensors().values() if isinstance(t, gs.Constant)}
    available.add("")  # an omitted optional input
    produced: dict[str, str] = {}
    names: collections.Counter[str] = collections.Counter(n.name for n in g.nodes if n.name)
    for name, count in names.items():
        if count > 1:
            problems.append(f"node name '{name}' is used by {count} nodes")
    all_outputs = {t.name for n in g.nodes for t in n.outputs}
    for node in g.nodes:
        for t in node.inputs:
            if t.name not in available:
                if t.name in all_outputs:
                    problems.append(f"node '{node.name}' ({node.op}) reads '{t.name}' before it is produced (not topologically sorted)")
                else:
                    problems.append(f"node '{node.name}' ({node.op}) reads '{t.name}', which nothing produces (dangling edge)")
        for t in node.outputs:
            if not t.name:
                continue  # an omitted optional output
            if t.name in produced:
                problems.append(f"tensor '{t.name}' is produced by both '{produced[t.name]}' and '{node.name}'")
            produced[t.name] = node.name
            available.add(t.name)
    for t in g.outputs:
        if t.name not in available:
            problems.append(f"graph output '{t.name}' is not produced by any node")
    return problems


def onnx_checks(model: onnx.ModelProto, *, shapes: bool = True) -> None:
    """The ONNX checker and (``shapes``) strict shape inference; raises :class:`GraphCheckError`.

    ``model`` is changed: its external weights become typed inputs first. The
    checker would look for external files relative to the current directory,
    and no check needs the weights' values.
    """
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if external:
        keep = [t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise GraphCheckError(f"ONNX checker: {str(e).strip().splitlines()[0]}") from None
    if shapes:
        try:
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        except Exception as e:
            raise GraphCheckError(f"shape inference: {str(e).strip().splitlines()[0]}") from None
