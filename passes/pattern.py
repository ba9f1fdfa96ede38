"""A small declarative matcher for the fusions: a pattern of ops and operands, matched upward from a tensor.

A pattern is a tree of four parts:

* :class:`Op`: a node of one of the given op types, with patterns for its first
  operands. ``commute`` tries both orders of a binary node's operands;
  ``casts`` walks up through float Casts before the node (recorded with that
  role); ``role`` names the node in near-miss reasons and in :func:`leak`'s;
  ``name`` captures it. Custom-domain nodes match too (``leak`` declines them
  with a reason) unless ``onnx_only``.
* :class:`Const`: a constant (an initializer, a Constant node, or an Identity
  copy of either), its value captured; ``scalar`` wants one element of rank
  0 or 1, and ``plain`` reads initializers and Constant nodes only.
* :class:`Var`: any tensor, captured; a name bound twice must be the same
  tensor (``Mul(x, x)``). ``not_scalar`` refuses a constant scalar.
* :class:`Or`: the first alternative that matches.

:func:`match` (from a tensor) and :func:`match_node` (from a known node, such
as a fusion's anchor) return a :class:`Found` (the nodes with their roles,
and the captures) or a :class:`Miss` with the reason: the ``why`` of the part
that failed. A ``why`` may name what was found instead: ``{found}`` (the op
type, or ``missing`` where no node makes the tensor) and ``{source}`` (where
the tensor comes from); a callable gets the graph, the tensor and its
producer. Of the two operand orders of a commutative node, and of an
:class:`Or`'s alternatives, the attempt that matched more parts gives the
reason (the first on a tie); an :class:`Or` none of whose alternatives got
past its op type gives its own ``why``.

    # variance + eps: the operands in either order, float Casts above the ReduceMean
    VARIANCE_EPS = Op("Add",
                      Op("ReduceMean", name="variance", role="the variance", casts="a Cast of the variance",
                         why="the Add before Sqrt has no ReduceMean operand"),
                      Const("eps", why="epsilon is not a constant ({source})"),
                      commute=True, role="variance + eps")
    found = match(graph, VARIANCE_EPS, sqrt.inputs[0])
    if isinstance(found, Miss):
        return found.reason
    eps, variance = found.value("eps"), found.node("variance")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from passes.const_values import Scalar, const_value, scalar, to_scalar
from passes.matching import Role, describe_source, skip_up
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.ir.validate import is_custom_domain

#: A reason, or how to write it from (graph, tensor, its producer or None).
Why = str | Callable[[Graph, Tensor, Node | None], str]


@dataclass(frozen=True, init=False)
class Op:
    """A node of one of ``ops`` whose first operands match ``inputs`` (see the module docstring)."""

    ops: tuple[str, ...]
    inputs: tuple[Pattern, ...]
    name: str
    role: str
    casts: str
    commute: bool
    onnx_only: bool
    why: Why
    operands_why: Why
    missing: str

    def __init__(self, op: str | tuple[str, ...], *inputs: Pattern, name: str = "", role: str = "", casts: str = "",
                 commute: bool = False, onnx_only: bool = False, why: Why = "", operands_why: Why = "",
                 missing: str = "no node") -> None:  # fmt: skip
        """``operands_why``: the reason when the op matches but its operands do not (default: the operand's own)."""
        ops = (op,) if isinstance(op, str) else tuple(op)
        if commute and len(inputs) != 2:
            raise ValueError(f"Op({'/'.join(ops)}): commute needs two operand patterns, got {len(inputs)}")
        for key, value in (("ops", ops), ("inputs", inputs), ("name", name), ("role", role), ("casts", casts), ("commute", commute),
                           ("onnx_only", onnx_only), ("why", why or f"found {{found}}, expected {'/'.join(ops)}"),
                           ("operands_why", operands_why), ("missing", missing)):  # fmt: skip
            object.__setattr__(self, key, value)


@dataclass(frozen=True)
class Const:
    """A constant tensor, its value captured as ``name`` (a :class:`~passes.const_values.Scalar` with ``scalar``)."""

    name: str
    scalar: bool = False
    plain: bool = False
    why: Why = "{name} is not a constant ({source})"


@dataclass(frozen=True)
class Var:
    """Any tensor, captured as ``name`` ("" captures nothing); bound twice, the same tensor."""

    name: str = ""
    not_scalar: bool = False
    why: Why = "{name} is not the same tensor in both places"


@dataclass(frozen=True, init=False)
class Or:
    """The first of ``alternatives`` that matches; ``casts`` are skipped once, before any of them."""

    alternatives: tuple[Pattern, ...]
    casts: str
    why: Why
    missing: str

    def __init__(self, *alternatives: Pattern, casts: str = "", why: Why = "", missing: str = "no node") -> None:
        object.__setattr__(self, "alternatives", alternatives)
        object.__setattr__(self, "casts", casts)
        object.__setattr__(self, "why", why or "found {found}, expected one of the alternatives")
        object.__setattr__(self, "missing", missing)


Pattern = Op | Const | Var | Or


@dataclass
class Found:
    """A match: every node with its role (Casts included; producers last, or first with ``post_order``) and the captures."""

    roles: list[Role] = field(default_factory=list)
    nodes: dict[str, Node] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)
    #: Pattern parts matched (which of two failed attempts got further).
    depth: int = 0

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def tensor(self, name: str) -> Tensor:
        return self.tensors[name]

    def value(self, name: str) -> np.ndarray:
        return self.values[name]

    def scalar(self, name: str) -> Scalar:
        return self.scalars[name]

    def copy(self) -> Found:
        return Found(list(self.roles), dict(self.nodes), dict(self.tensors), dict(self.values), dict(self.scalars), self.depth)


@dataclass(frozen=True)
class Miss:
    """Why a pattern did not match, and how many of its parts did."""

    reason: str
    depth: int = 0


def match(graph: Graph, pattern: Pattern, tensor: Tensor, *, post_order: bool = False) -> Found | Miss:
    """Match ``pattern`` at ``tensor`` (an :class:`Op` at the node that makes it)."""
    return _Matcher(graph, post_order).tensor(pattern, tensor, Found())


def match_node(graph: Graph, pattern: Op, node: Node, *, post_order: bool = False) -> Found | Miss:
    """Match ``pattern`` at ``node`` itself (its op type and operands)."""
    return _Matcher(graph, post_order).node(pattern, node, None, Found())


class _Matcher:
    def __init__(self, graph: Graph, post_order: bool) -> None:
        self.graph = graph
        self.post_order = post_order

    def reason(self, why: Why, tensor: Tensor, prod: Node | None, missing: str = "no node", **names: str) -> str:
        if callable(why):
            return why(self.graph, tensor, prod)
        fields = dict(names)
        if "{found}" in why:
            fields["found"] = prod.op if prod is not None else missing
        if "{source}" in why:
            fields["source"] = describe_source(self.graph, tensor)
        return why.format(**fields)

    def tensor(self, p: Pattern, t: Tensor, f: Found) -> Found | Miss:
        if isinstance(p, Var):
            return self.var(p, t, f)
        if isinstance(p, Const):
            return self.const(p, t, f)
        casts: list[Node] = []
        if p.casts:
            t, casts = skip_up(self.graph, t)
        prod = self.graph.producer(t)
        at = len(f.roles)  # where this part's roles begin
        if isinstance(p, Or):
            got = self.alternatives(p, t, prod, f)
        elif prod is None:
            return Miss(self.reason(p.why, t, prod, p.missing), f.depth)
        else:
            got = self.node(p, prod, t, f)
        if isinstance(got, Found) and casts:
            cast_roles = [(p.casts, c) for c in casts]
            # Pre-order: the Casts above a node come before it; post-order: after it, in the order data flows.
            if self.post_order:
                got.roles += cast_roles[::-1]
            else:
                got.roles[at:at] = cast_roles
        return got

    def alternatives(self, p: Or, t: Tensor, prod: Node | None, f: Found) -> Found | Miss:
        misses = []
        for alt in p.alternatives:
            got = self.tensor(alt, t, f.copy())
            if isinstance(got, Found):
                return got
            misses.append(got)
        best = max(misses, key=lambda m: m.depth, default=Miss("", f.depth))
        if best.depth <= f.depth:  # no alternative got past its op type
            return Miss(self.reason(p.why, t, prod, p.missing), f.depth)
        return best

    def node(self, p: Op, node: Node, t: Tensor | None, f: Found) -> Found | Miss:
        if node.op not in p.ops or (p.onnx_only and is_custom_domain(node.domain)):
            return Miss(self.reason(p.why, t if t is not None else node.outputs[0], node, p.missing), f.depth)
        f.depth += 1
        at = len(f.roles)
        got = self.operands(p, node, f) if p.inputs else f
        if isinstance(got, Miss):
            if p.operands_why:
                return Miss(self.reason(p.operands_why, t if t is not None else node.outputs[0], node, p.missing), got.depth)
            return got
        if p.role:
            if self.post_order:
                got.roles.append((p.role, node))
            else:
                got.roles.insert(at, (p.role, node))
        if p.name:
            got.nodes[p.name] = node
        return got

    def operands(self, p: Op, node: Node, f: Found) -> Found | Miss:
        if len(node.inputs) < len(p.inputs) or (p.commute and len(node.inputs) != 2):
            return Miss(f"{node.op} '{node.name}' has {len(node.inputs)} inputs, expected {len(p.inputs)}", f.depth)
        orders = [node.inputs[: len(p.inputs)]]
        if p.commute:
            orders.append(orders[0][::-1])
        misses = []
        for ins in orders:
            got: Found | Miss = f.copy()
            for sub, t in zip(p.inputs, ins):
                if isinstance(got, Miss):
                    break
                got = self.tensor(sub, t, got)
            if isinstance(got, Found):
                return got
            misses.append(got)
        return max(misses, key=lambda m: m.depth)  # the first on a tie

    def var(self, p: Var, t: Tensor, f: Found) -> Found | Miss:
        if p.name in f.tensors and f.tensors[p.name] is not t:
            return Miss(self.reason(p.why, t, self.graph.producer(t), name=p.name), f.depth)
        if p.not_scalar and scalar(self.graph, t) is not None:
            return Miss(f"{p.name or 'the operand'} is a constant scalar", f.depth)
        if p.name:
            f.tensors[p.name] = t
        f.depth += 1
        return f

    def const(self, p: Const, t: Tensor, f: Found) -> Found | Miss:
        value = self.graph.const_value(t) if p.plain else const_value(self.graph, t)
        if value is None or (p.scalar and (value.size != 1 or value.ndim > 1)):
            return Miss(self.reason(p.why, t, self.graph.producer(t), name=p.name), f.depth)
        f.tensors[p.name] = t
        f.values[p.name] = value
        if p.scalar:
            f.scalars[p.name] = to_scalar(value)
        f.depth += 1
        return f
