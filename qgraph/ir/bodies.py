"""A model's bodies and their structure: the main graph, every subgraph, every model-local function.

An ONNX model holds nodes in more places than its main graph: the bodies of
``If``, ``Loop`` and ``Scan`` (graphs in node attributes, nested to any depth)
and the model-local functions (whose bodies may hold such nodes too).
:func:`iter_bodies` walks all of them, each as a :class:`Body` that knows where
it is and which names the graphs around it define (a subgraph may read those;
a function body sees only its own inputs). :func:`check_structure` checks one
body: each tensor made once (and never one that an enclosing graph already
defines), every input made by something, every output made, no cycle.

:mod:`qgraph.ir.validate` runs the checks of every body; this module reads
only the ModelProto.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import onnx
from onnx import AttributeProto, GraphProto, TensorProto

from qgraph.errors import InvalidModelError

_MAX_SHOWN = 3


@dataclass(frozen=True)
class Body:
    """One body of nodes: what it defines itself, what it must make, and where it is."""

    #: "" for the main graph, else e.g. "attribute 'body' of node 'loop' in function 'local.F'".
    where: str
    nodes: Sequence[onnx.NodeProto]
    #: Its inputs (in order, for the duplicate check) and the names its initializers define.
    inputs: Sequence[str]
    initializer_names: frozenset[str]
    outputs: Sequence[str]
    #: The opsets its nodes are resolved against (a function's own imports over the model's).
    opsets: Mapping[str, int]
    #: The names the enclosing graphs define, innermost first (empty for the main graph and functions).
    outer: tuple[frozenset[str], ...] = ()
    #: A subgraph's own GraphProto (its initializers and value_info are checked like the main graph's).
    graph: GraphProto | None = field(default=None, repr=False)

    def of(self, what: str) -> str:
        """``what`` placed in this body: "node 'n' (Relu)" -> "node 'n' (Relu) in function 'local.F'"."""
        return f"{what} in {self.where}" if self.where else what

    def visible_outside(self, name: str) -> bool:
        return any(name in scope for scope in self.outer)


def model_opsets(imports: Sequence[onnx.OperatorSetIdProto]) -> dict[str, int]:
    """Domain -> version; ``ai.onnx`` is the default domain ``""``."""
    return {("" if imp.domain == "ai.onnx" else imp.domain): imp.version for imp in imports}


def iter_bodies(model: onnx.ModelProto) -> Iterator[Body]:
    """The main graph first, then every subgraph and function body, each before the subgraphs inside it."""
    opsets = model_opsets(model.opset_import)
    g = model.graph
    inits = frozenset(t.name for t in g.initializer) | {s.values.name for s in g.sparse_initializer}
    roots = [Body("", g.node, [vi.name for vi in g.input], inits, [vi.name for vi in g.output], opsets)]
    for f in model.functions:
        where = f"function '{f.domain}.{f.name}'" if f.domain else f"function '{f.name}'"
        roots.append(Body(where, f.node, list(f.input), frozenset(), list(f.output), {**opsets, **model_opsets(f.opset_import)}))
    # A stack, not recursion: a hostile file may nest subgraphs deeply.
    stack = roots[::-1]
    while stack:
        body = stack.pop()
        yield body
        stack.extend(reversed(list(_subgraphs(body))))


def _subgraphs(body: Body) -> Iterator[Body]:
    # The names this body defines, computed once and shared by all its subgraphs.
    defined = frozenset(body.inputs) | body.initializer_names | {o for n in body.nodes for o in n.output if o}
    outer = (defined, *body.outer)
    for node in body.nodes:
        for a in node.attribute:
            if a.type not in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                continue
            where = f"attribute '{a.name}' of node '{node.name or node.op_type}'" + (f" in {body.where}" if body.where else "")
            for sub in [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs):
                inits = frozenset(t.name for t in sub.initializer) | {s.values.name for s in sub.sparse_initializer}
                yield Body(where, sub.node, [vi.name for vi in sub.input], inits, [vi.name for vi in sub.output],
                           body.opsets, outer, sub)  # fmt: skip


def attribute_tensors(bodies: Sequence[Body]) -> Iterator[tuple[TensorProto, str]]:
    """Tensors stored in node attributes and subgraph initializers of every body, with where they are."""
    for body in bodies:
        if body.graph is not None:
            for t in body.graph.initializer:
                yield t, f"initializer '{t.name}' of {body.where}"
        for node in body.nodes:
            for a in node.attribute:
                if a.ref_attr_name:  # a function's reference to its caller's attribute: no value here
                    continue
                where = body.of(f"attribute '{a.name}' of node '{node.name or node.op_type}'")
                if a.type == AttributeProto.TENSOR:
                    yield a.t, f"the tensor in {where}"
                elif a.type == AttributeProto.TENSORS:
                    for t in a.tensors:
                        yield t, f"a tensor in {where}"


# ---------------------------------------------------------------- structure
def _label(node: onnx.NodeProto, i: int) -> str:
    return f"'{node.name}' ({node.op_type})" if node.name else f"#{i} ({node.op_type})"


def check_structure(body: Body) -> list[int]:
    """Raise for a malformed structure of ``body``; returns a topological order of its nodes."""
    given: set[str] = set()
    for name in body.inputs:
        if name in given:
            what = body.of("graph input '" + name + "'")
            raise InvalidModelError(f"{what} is declared twice; input names must be unique")
        given.add(name)
    given |= body.initializer_names
    producer: dict[str, int] = {}
    for i, node in enumerate(body.nodes):
        for name in node.output:
            if not name:
                continue
            if name in producer:
                first = producer[name]
                raise InvalidModelError(
                    f"tensor '{name}' is produced by node {_label(body.nodes[first], first)} and by node {_label(node, i)}"
                    + (f" in {body.where}" if body.where else "")
                    + "; each tensor must be produced once"
                )
            if name in given:
                raise InvalidModelError(
                    f"node {body.of(_label(node, i))} writes '{name}', which is a graph input or initializer; rename one of them"
                )
            if body.visible_outside(name):
                raise InvalidModelError(
                    f"node {body.of(_label(node, i))} writes '{name}', which an enclosing graph already defines; "
                    "names must be unique across a graph and its subgraphs: re-export the model"
                )
            producer[name] = i
    for i, node in enumerate(body.nodes):
        for name in node.input:
            if name and name not in given and name not in producer and not body.visible_outside(name):
                scopes = ", an initializer, any node's output or a name of an enclosing graph" if body.outer else (
                    ", an initializer or any node's output")  # fmt: skip
                raise InvalidModelError(
                    f"node {body.of(_label(node, i))} reads '{name}', which is not a graph input{scopes}; "
                    "the graph is incomplete (add the missing input, or re-export it)"
                )
    for name in body.outputs:
        if name not in given and name not in producer and not body.visible_outside(name):
            what = f"output '{name}' of {body.where}" if body.where else f"graph output '{name}'"
            raise InvalidModelError(f"{what} is not produced by any node; the graph is incomplete")
    return _check_acyclic(body, producer)


def _check_acyclic(body: Body, producer: dict[str, int]) -> list[int]:
    """Kahn's algorithm over the node -> node edges: the order, or an error naming one cycle."""
    nodes = body.nodes
    n = len(nodes)
    deps = [{producer[x] for x in node.input if x in producer} for node in nodes]
    users: list[list[int]] = [[] for _ in range(n)]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    missing = [len(d) for d in deps]
    ready = [i for i in reversed(range(n)) if missing[i] == 0]
    order: list[int] = []
    while ready:
        i = ready.pop()
        order.append(i)
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                ready.append(u)
    if len(order) == n:
        return order
    # Every node left waits on another node left: walking back from one must repeat.
    left = {i for i in range(n) if missing[i] > 0}
    path: list[int] = []
    seen: dict[int, int] = {}
    i = next(iter(sorted(left)))
    while i not in seen:
        seen[i] = len(path)
        path.append(i)
        i = next(j for j in sorted(deps[i]) if j in left)
    cycle = path[seen[i] :] + [i]
    shown = " -> ".join(_label(nodes[j], j) for j in reversed(cycle[-(_MAX_SHOWN * 2) :]))
    raise InvalidModelError(f"{body.where or 'the graph'} has a cycle ({shown}); an ONNX graph must be acyclic: re-export the model")
