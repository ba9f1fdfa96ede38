"""Graph walks the fusions share: through float Casts, to a sole consumer, to a constant operand, and
why a matched node cannot be fused away (:func:`leak`).

The declarative patterns of :mod:`passes.pattern` are built on these; a fusion
uses them directly for what a pattern does not say (walking down to consumers,
two tensors that must share a root).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from passes.const_values import MAX_HOPS, Scalar, default_domain, scalar
from passes.constants import FLOAT_TYPES
from passes.dtypes import tensor_dtype
from qgraph.ir.graph import Graph, Node, Tensor

#: A node of a matched pattern and its role, as near-miss reasons name it ("the mean").
Role = tuple[str, Node]


def is_float_cast(node: Node | None) -> bool:
    return node is not None and node.op == "Cast" and int(node.attrs.get("to", 0)) in FLOAT_TYPES


def up_through_casts(graph: Graph, tensor: Tensor) -> tuple[list[Tensor], list[Node]]:
    """``[t, t1, ...]`` and the float-to-float Casts between them: ``casts[i]`` makes ``tensors[i]``.

    A Cast from a tensor known not to be a float (int -> float) is not passed.
    """
    tensors: list[Tensor] = [tensor]
    casts: list[Node] = []
    while len(casts) < MAX_HOPS:
        prod = graph.producer(tensors[-1])
        if prod is None or not is_float_cast(prod):
            break
        source = tensor_dtype(graph, prod.inputs[0])
        if source is not None and source not in FLOAT_TYPES:
            break
        casts.append(prod)
        tensors.append(prod.inputs[0])
    return tensors, casts


def skip_up(graph: Graph, tensor: Tensor) -> tuple[Tensor, list[Node]]:
    """The tensor above ``tensor`` through float Casts, and those Casts."""
    tensors, casts = up_through_casts(graph, tensor)
    return tensors[-1], casts


def skip_down(graph: Graph, tensor: Tensor) -> tuple[Tensor, list[Node]]:
    """Follow ``tensor`` through float Casts that are its only consumer."""
    casts: list[Node] = []
    while len(casts) < MAX_HOPS and len(tensor.outputs) == 1 and not graph.is_graph_output(tensor):
        nxt = tensor.outputs[0]
        if not is_float_cast(nxt):
            break
        casts.append(nxt)
        tensor = nxt.outputs[0]
    return tensor, casts


def sole_consumer(graph: Graph, tensor: Tensor) -> Node | None:
    """The one consumer of an intermediate tensor (None if several, none, or a graph output)."""
    if len(tensor.outputs) != 1 or graph.is_graph_output(tensor):
        return None
    return tensor.outputs[0]


def bypass(graph: Graph, node: Node, source: Tensor) -> bool:
    """Make the consumers of ``node``'s output read ``source`` and drop ``node``; False for a graph output (kept)."""
    out = node.outputs[0]
    if graph.is_graph_output(out):
        return False
    graph.replace_uses(out, source)
    graph.remove_nodes([node])
    return True


def other_input(node: Node, tensor: Tensor) -> Tensor:
    """The operand of a binary node that is not ``tensor`` (``tensor`` itself for f(t, t))."""
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


def const_operand(graph: Graph, node: Node) -> tuple[Scalar, Tensor] | None:
    """For a binary node with exactly one constant scalar operand: (its value, the other operand)."""
    if len(node.inputs) != 2:
        return None
    a, b = (scalar(graph, t) for t in node.inputs)
    if a is not None and b is None:
        return a, node.inputs[1]
    if b is not None and a is None:
        return b, node.inputs[0]
    return None


def describe_source(graph: Graph, tensor: Tensor) -> str:
    """Where a tensor comes from, for a reason: "it comes from Cast 'n3'", "it is the graph input 'eps'"."""
    prod = graph.producer(tensor)
    if prod is not None:
        return f"it comes from {prod.op} '{prod.name}'"
    if any(t is tensor for t in graph.inputs):
        return f"it is the graph input '{tensor.name}'"
    return f"it is '{tensor.name}'"


def leak(graph: Graph, roles: Sequence[Role], final: Tensor) -> str | None:
    """Why a matched node cannot be fused away (a custom-domain op, or an output other than ``final`` used elsewhere), or None."""
    inside = {id(n) for _, n in roles}
    for role, node in roles:
        if not default_domain(node):  # com.example.Sqrt is not ONNX's Sqrt: custom ops are left alone
            return f"{role} is the custom op {node.domain}.{node.op}"
        for out in node.outputs:
            if out is final:
                continue
            if graph.is_graph_output(out):
                return f"{role} is a graph output"
            if any(id(c) not in inside for c in out.outputs):
                return f"{role} is also used outside the pattern"
    return None


def common_root(graph: Graph, a: Tensor, b: Tensor, inside: Iterable[Node]) -> tuple[Tensor, list[Node]] | None:
    """The farthest tensor both ``a`` and ``b`` are float Casts of, with the Casts to fuse.

    A Cast is fused only if every consumer of its output is in ``inside`` or
    is another fused Cast; otherwise a nearer common tensor is taken.
    """
    ta, ca = up_through_casts(graph, a)
    tb, cb = up_through_casts(graph, b)
    common = [i for i, t in enumerate(ta) if any(t is u for u in tb)]
    base = {id(n) for n in inside}
    for ia in reversed(common):
        ib = next(j for j, u in enumerate(tb) if u is ta[ia])
        casts = list(ca[:ia]) + [c for c in cb[:ib] if all(c is not d for d in ca[:ia])]
        ids = base | {id(c) for c in casts}
        if all(not graph.is_graph_output(c.outputs[0]) and all(id(u) in ids for u in c.outputs[0].outputs) for c in casts):
            return ta[ia], casts
    return None


def last_in_order(graph: Graph, nodes: Iterable[Node]) -> Node:
    """The node of ``nodes`` that comes last in the graph (the fused node goes after it)."""
    return graph.last_of(nodes)
