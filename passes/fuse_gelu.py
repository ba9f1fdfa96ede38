"""Fuse a decomposed GELU into one ``Gelu`` node (opset 20).

    # tanh form (GPT-2's gelu_new): y = 0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x^3)))
    # erf form (exact GELU):        y = 0.5*x*(1 + erf(x/sqrt(2)))

The match starts at the Tanh or Erf. The cube is ``Pow(x, 3)`` or ``x*x*x``; the
tanh argument is ``k*(x + c*x^3)`` or the folded ``k*x + (k*c)*x^3``; the erf
argument is ``x/sqrt(2)`` or ``x*(1/sqrt(2))``. The outer product may take 0.5
first, last or with the 1 + t (``(0.5*x)*(1+t)``, ``(x*(1+t))*0.5``,
``x*((1+t)*0.5)``, ``x*(0.5*t + 0.5)``); every Add and Mul in either operand
order. Constants are compared with a relative tolerance of 1e-4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from passes.const_values import Scalar, close
from passes.matching import Role, const_operand, last_in_order, leak, sole_consumer
from passes.opset import OpsetFusionPass
from passes.pattern import Const, Miss, Op, Or, Var, match
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.pipeline.fusion import Match

GELU_OPSET = 20
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # 0.7978845608
CUBIC = 0.044715
SQRT_2 = math.sqrt(2.0)

# c*u: a Mul with exactly one constant scalar factor, on either side
SCALED = Op("Mul", Const("c", scalar=True), Var("u", not_scalar=True), commute=True, name="mul")
# x^3 as Pow(x, 3), Mul(Mul(x, x), x) or Mul(x, Mul(x, x))
CUBE = Or(
    Op("Pow", Var("x"), Const("exponent", scalar=True, why="Pow exponent is not a constant scalar"), name="cube", role="x^3"),
    Op("Mul", Op("Mul", Var("x"), Var("x"), role="x^2"), Var("x"), commute=True, name="cube", role="x^3",
       operands_why="the cubic term is a Mul that is not x*x*x"),
    why="the cubic term comes from {found}, expected Pow(x, 3) or x*x*x",
)  # fmt: skip
# x + c*x^3 inside k*(...)
INNER_ADD = Op("Add", name="add", why="the tanh argument is k*{found}, expected k*(x + 0.044715*x^3)", missing="input")
# x/sqrt(2) or x*(1/sqrt(2)), the factor on either side
ERF_ARGUMENT = Or(
    Op("Div", Var("x"), Const("c", scalar=True, why="the erf argument is x divided by a non-constant, expected x/sqrt(2)"),
       name="arg", role="the erf argument"),
    Op("Mul", Const("c", scalar=True), Var("x", not_scalar=True), commute=True, name="arg", role="the erf argument",
       operands_why="the Erf input comes from {found}, expected x/sqrt(2)"),
    why="the Erf input comes from {found}, expected x/sqrt(2)",
)  # fmt: skip


@dataclass(kw_only=True)
class GeluMatch(Match):
    """A GELU site: its input and output (``kind`` tells the tanh form from the erf form)."""

    x: Tensor
    y: Tensor


def _cube_of(graph: Graph, t: Tensor) -> tuple[Tensor, list[Role]] | str:
    """``t = x^3`` as ``Pow(x, 3)``, ``Mul(Mul(x, x), x)`` or ``Mul(x, Mul(x, x))``: (x, nodes)."""
    found = match(graph, CUBE, t, post_order=True)
    if isinstance(found, Miss):
        return found.reason
    if found.node("cube").op == "Pow" and (e := found.scalar("exponent")) != 3:
        return f"Pow exponent is {e:g}, expected 3"
    return found.tensor("x"), found.roles


def _scaled(graph: Graph, t: Tensor) -> tuple[Scalar, Tensor, Node] | None:
    """``t = c*u`` with a constant scalar c: (c, u, the Mul)."""
    found = match(graph, SCALED, t)
    return None if isinstance(found, Miss) else (found.scalar("c"), found.tensor("u"), found.node("mul"))


def _tanh_argument(graph: Graph, tanh: Node) -> tuple[Tensor, list[Role]] | str:
    """x from ``tanh(k*(x + c*x^3))`` or ``tanh(k*x + (k*c)*x^3)``, with the nodes."""
    arg = tanh.inputs[0]
    p = graph.producer(arg)
    scaled = _scaled(graph, arg)
    if scaled is not None:
        # k*(x + c*x^3)
        k, inner, mul_k = scaled
        if not close(k, SQRT_2_OVER_PI):
            return f"tanh coefficient {k:g} is not sqrt(2/pi) ({SQRT_2_OVER_PI:.7f})"
        inner_add = match(graph, INNER_ADD, inner)
        if isinstance(inner_add, Miss):
            return inner_add.reason
        add = inner_add.node("add")
        reason = "the Add inside tanh is not x + 0.044715*x^3"
        for x, term in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            cterm = _scaled(graph, term)
            if cterm is None:
                continue
            c, cube_t, mul_c = cterm
            cube = _cube_of(graph, cube_t)
            if isinstance(cube, str):
                reason = cube
                continue
            if cube[0] is not x:
                reason = "the cubed tensor is not the tensor it is added to"
                continue
            if not close(c, CUBIC):
                return f"cubic coefficient {c:g} is not {CUBIC}"
            return x, [*cube[1], ("0.044715*x^3", mul_c), ("x + 0.044715*x^3", add), ("the tanh argument", mul_k)]
        return reason
    if p is not None and p.op == "Add":
        # k*x + (k*c)*x^3
        terms = [_scaled(graph, t) for t in p.inputs]
        if terms[0] is None or terms[1] is None:
            return "the Add inside tanh is not k*x + k*0.044715*x^3"
        reason = "the Add inside tanh is not k*x + k*0.044715*x^3"
        for lin, cub in ((terms[0], terms[1]), (terms[1], terms[0])):
            cube = _cube_of(graph, cub[1])
            if isinstance(cube, str):
                reason = cube
                continue
            x = cube[0]
            if lin[1] is not x:
                reason = "the cubed tensor is not the tensor in the linear term"
                continue
            if not close(lin[0], SQRT_2_OVER_PI):
                return f"tanh coefficient {lin[0]:g} is not sqrt(2/pi) ({SQRT_2_OVER_PI:.7f})"
            if not close(cub[0], SQRT_2_OVER_PI * CUBIC):
                return f"cubic coefficient {cub[0]:g} is not sqrt(2/pi)*0.044715 ({SQRT_2_OVER_PI * CUBIC:.7f})"
            return x, [*cube[1], ("k*x", lin[2]), ("k*0.044715*x^3", cub[2]), ("the tanh argument", p)]
        return reason
    what = "a Mul without a constant scalar factor" if p is not None and p.op == "Mul" else p.op if p else "a graph input"
    return f"the Tanh input is {what}, expected sqrt(2/pi)*(x + 0.044715*x^3)"


def _erf_argument(graph: Graph, erf: Node) -> tuple[Tensor, list[Role]] | str:
    """x from ``erf(x/sqrt(2))`` or ``erf(x*(1/sqrt(2)))``, with the node."""
    found = match(graph, ERF_ARGUMENT, erf.inputs[0])
    if isinstance(found, Miss):
        return found.reason
    c = found.scalar("c")
    if found.node("arg").op == "Div" and not close(c, SQRT_2):
        return f"the erf argument is x/{c:g}, expected x/sqrt(2) (x/{SQRT_2:.7f})"
    if found.node("arg").op == "Mul" and not close(c, 1 / SQRT_2):
        return f"the erf argument is x*{c:g}, expected x*(1/sqrt(2)) (x*{1 / SQRT_2:.7f})"
    return found.tensor("x"), found.roles


def _half_check(value: float) -> str | None:
    return None if close(value, 0.5) else f"the outer factor {value:g} is not 0.5"


def _outer(graph: Graph, act: Node, x: Tensor, fn: str) -> tuple[Tensor, list[Role]] | str:
    """The output y of ``0.5*x*(1 + t)`` around ``t = act(...)``, in its four spellings."""
    t = act.outputs[0]
    first = sole_consumer(graph, t)
    if first is None:
        return f"the {fn} output has {len(t.outputs)} consumers{' and is a graph output' if graph.is_graph_output(t) else ''}, expected one"
    one = const_operand(graph, first) if first.op in ("Add", "Mul") else None
    if one is None:
        return f"the {fn} output feeds {first.op}, expected Add(1, {fn}) or Mul(0.5, {fn})"
    value, _ = one
    if first.op == "Mul":
        # x * (0.5*t + 0.5)
        if (problem := _half_check(value)) is not None:
            return problem
        add = sole_consumer(graph, first.outputs[0])
        half = const_operand(graph, add) if add is not None and add.op == "Add" else None
        if add is None or half is None:
            return f"0.5*{fn} is not followed by + 0.5"
        if (problem := _half_check(half[0])) is not None:
            return problem
        last = sole_consumer(graph, add.outputs[0])
        if last is None or last.op != "Mul" or not any(t is x for t in last.inputs):
            return f"0.5 + 0.5*{fn} is not multiplied by x"
        return last.outputs[0], [(f"0.5*{fn}", first), (f"0.5 + 0.5*{fn}", add), ("y", last)]
    if not close(value, 1.0):
        return f"the {fn} is added to {value:g}, expected 1"
    roles: list[Role] = [(f"1 + {fn}", first)]
    nxt = sole_consumer(graph, first.outputs[0])
    if nxt is None or nxt.op != "Mul":
        return f"1 + {fn} feeds {nxt.op if nxt else 'several nodes'}, expected Mul"
    other = nxt.inputs[1] if nxt.inputs[0] is first.outputs[0] else nxt.inputs[0]
    half = const_operand(graph, nxt)
    if other is x:
        # (x * (1 + t)) * 0.5
        last = sole_consumer(graph, nxt.outputs[0])
        found = const_operand(graph, last) if last is not None and last.op == "Mul" else None
        if last is None or found is None:
            return f"x*(1 + {fn}) is not multiplied by 0.5"
        if (problem := _half_check(found[0])) is not None:
            return problem
        return last.outputs[0], [*roles, (f"x*(1 + {fn})", nxt), ("y", last)]
    if half is not None:
        # x * ((1 + t) * 0.5)
        if (problem := _half_check(half[0])) is not None:
            return problem
        last = sole_consumer(graph, nxt.outputs[0])
        if last is None or last.op != "Mul" or not any(t is x for t in last.inputs):
            return f"0.5*(1 + {fn}) is not multiplied by x"
        return last.outputs[0], [*roles, (f"0.5*(1 + {fn})", nxt), ("y", last)]
    # (0.5 * x) * (1 + t)
    scaled = _scaled(graph, other)
    if scaled is None or scaled[1] is not x:
        return f"1 + {fn} is multiplied by neither x nor 0.5*x"
    if (problem := _half_check(scaled[0])) is not None:
        return problem
    return nxt.outputs[0], [*roles, ("0.5*x", scaled[2]), ("y", nxt)]


class FuseGelu(OpsetFusionPass[GeluMatch]):
    """Decomposed GELU (tanh or erf form) -> ``Gelu(approximate="tanh" | "none")``."""

    name = "fuse-gelu"
    produces = ("gelu_fused",)
    invalidates = ("no_dead_nodes",)
    anchors = ("Tanh", "Erf")
    stat = "gelu"
    min_opset = GELU_OPSET
    fused_op = "Gelu"

    def match(self, graph: Graph, anchor: Node) -> GeluMatch | str:
        # tanh: y = 0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x^3)));  erf: y = 0.5*x*(1 + erf(x/sqrt(2)))
        fn = anchor.op.lower()
        inner = _tanh_argument(graph, anchor) if anchor.op == "Tanh" else _erf_argument(graph, anchor)
        if isinstance(inner, str):
            return inner
        x, roles = inner
        outer = _outer(graph, anchor, x, fn)
        if isinstance(outer, str):
            return outer
        y, tail = outer
        kind = "gelu_tanh" if anchor.op == "Tanh" else "gelu_erf"
        return self.check(graph, [*roles, (f"the {fn}", anchor), *tail], x, y, kind)

    def check(self, graph: Graph, roles: list[Role], x: Tensor, y: Tensor, kind: str) -> GeluMatch | str:
        """The site as a match if it can be fused (nothing but y leaves it, the opset can be raised), else the reason."""
        if (problem := leak(graph, roles, y)) is not None:
            return problem
        if self.opset_problem:
            return self.opset_problem
        return GeluMatch(nodes=[n for _, n in roles], x=x, y=y, kind=kind)

    def rewrite(self, graph: Graph, m: GeluMatch) -> None:
        approximate = "tanh" if m.kind == "gelu_tanh" else "none"
        last = last_in_order(graph, m.nodes)
        graph.add_node("Gelu", [m.x], [m.y], {"approximate": approximate}, prefix=self.name, after=last)
        graph.remove_nodes(m.nodes)
