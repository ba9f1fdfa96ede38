"""The fusions' declarative matcher (passes/pattern.py): ops, operands, Casts, constants, captures, reasons."""

from __future__ import annotations

import pytest

from passes.pattern import Const, Found, Miss, Op, Or, Var, match, match_node
from qgraph.ir.graph import Graph, Node, Tensor

# y = sqrt(mean(x^2) + eps), eps read through an Identity, the variance cast to float16 and back
NORM = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[2, 4] x, float[2, 4] w) => (float[2, 1] y, float[2, 4] p, float[2, 4] q, float[2, 4] r) <float eps0 = {1e-5}> {
    eps = Identity (eps0)
    sq = Mul (x, x)
    var = ReduceMean <axes = [-1]> (sq)
    var16 = Cast <to = 10> (var)
    var32 = Cast <to = 1> (var16)
    ve = Add (eps, var32)
    y = Sqrt (ve)
    p = Mul (x, w)
    three = Constant <value = float {3.0}> ()
    q = Pow (x, three)
    r = Neg (x)
}
"""

VARIANCE_EPS = Op(
    "Add",
    Op("ReduceMean", Op("Mul", Var("x"), Var("x", why="Mul of two different tensors"), name="square", role="the square"),
       name="variance", role="the variance", casts="a Cast of the variance", why="the Add has no ReduceMean operand"),
    Const("eps", scalar=True, why="epsilon is not a constant ({source})"),
    commute=True, name="add", role="variance + eps", why="found {found}, expected Add", missing="an input",
)  # fmt: skip


@pytest.fixture
def g() -> Graph:
    return Graph.parse(NORM)


def out(graph: Graph, name: str) -> Tensor:
    return next(t for n in graph.nodes for t in n.outputs if t.name == name)


def node(graph: Graph, name: str) -> Node:
    node = graph.producer(out(graph, name))
    assert node is not None
    return node


def test_a_match_captures_nodes_tensors_and_constants_through_casts_and_either_operand_order(g: Graph) -> None:
    found = match(g, VARIANCE_EPS, node(g, "y").inputs[0])
    assert isinstance(found, Found), found
    # The Add reads (eps, variance): the second operand order matched, through the two Casts and the Identity.
    assert found.node("add") is node(g, "ve") and found.node("variance") is node(g, "var") and found.node("square") is node(g, "sq")
    assert found.tensor("x") is g.inputs[0] and found.tensor("eps") is out(g, "eps")
    assert found.scalar("eps") == pytest.approx(1e-5) and found.value("eps").shape == ()
    # Roles in pre-order (a node before its operands), the Casts just before the node they lead to.
    cast = "a Cast of the variance"
    assert [r for r, _ in found.roles] == ["variance + eps", cast, cast, "the variance", "the square"]
    assert [n.name for _, n in found.roles][1:3] == [node(g, "var32").name, node(g, "var16").name]


def test_post_order_lists_operands_first(g: Graph) -> None:
    found = match(g, VARIANCE_EPS, node(g, "y").inputs[0], post_order=True)
    assert isinstance(found, Found)
    cast = "a Cast of the variance"
    assert [r for r, _ in found.roles] == ["the square", "the variance", cast, cast, "variance + eps"]


def test_match_node_starts_at_a_known_node(g: Graph) -> None:
    found = match_node(g, Op("Sqrt", VARIANCE_EPS, role="the sqrt"), node(g, "y"))
    assert isinstance(found, Found) and found.roles[0] == ("the sqrt", node(g, "y"))
    miss = match_node(g, Op("Tanh", why="the anchor is a {found}"), node(g, "y"))
    assert miss == Miss("the anchor is a Sqrt", 0)


def test_each_failure_gives_the_reason_of_the_part_that_failed(g: Graph) -> None:
    # The op type, with what was found (or the missing text where no node makes the tensor).
    assert isinstance(m := match(g, VARIANCE_EPS, out(g, "y")), Miss) and m.reason == "found Sqrt, expected Add"
    assert isinstance(m := match(g, VARIANCE_EPS, g.inputs[0]), Miss) and m.reason == "found an input, expected Add"
    # A constant that is not one names where the tensor comes from.
    pattern = Op("Mul", Var("x"), Const("w", why="w is not a constant ({source})"))
    assert isinstance(m := match(g, pattern, out(g, "p")), Miss) and m.reason == "w is not a constant (it is the graph input 'w')"
    # The same name twice must be the same tensor: Mul(x, w) is not Mul(x, x).
    square = Op("Mul", Var("x"), Var("x", why="Mul of two different tensors"))
    assert isinstance(m := match(g, square, out(g, "p")), Miss) and m.reason == "Mul of two different tensors"
    assert isinstance(match(g, square, out(g, "sq")), Found)


def test_operand_orders_the_attempt_that_got_further_gives_the_reason(g: Graph) -> None:
    # Add(eps, variance) with a Mul that is not a square: the second order gets past the ReduceMean, so its reason wins.
    g.producer(out(g, "sq")).inputs[1] = g.inputs[1]  # type: ignore[union-attr]
    assert isinstance(m := match(g, VARIANCE_EPS, out(g, "ve")), Miss) and m.reason == "Mul of two different tensors"
    # Neither operand is a ReduceMean: both orders fail at the first operand, and the first order's reason is given.
    plain = Graph.parse(NORM.replace("ve = Add (eps, var32)", "ve = Add (eps, eps)"))
    assert isinstance(m := match(plain, VARIANCE_EPS, out(plain, "ve")), Miss) and m.reason == "the Add has no ReduceMean operand"
    # Both operands are the variance (one through Casts): both orders fail at epsilon, the first order's is given.
    twice = Graph.parse(NORM.replace("ve = Add (eps, var32)", "ve = Add (var, var32)"))
    assert isinstance(m := match(twice, VARIANCE_EPS, out(twice, "ve")), Miss)
    assert m.reason.startswith("epsilon is not a constant (it comes from Cast"), m.reason


def test_or_takes_the_first_alternative_that_matches_else_its_own_reason_or_the_deepest(g: Graph) -> None:
    cube = Or(
        Op("Pow", Var("x"), Const("e", scalar=True, why="the exponent is not a constant"), name="cube"),
        Op("Mul", Var("x"), Var("x"), name="cube", operands_why="a Mul that is not x*x"),
        why="the cube comes from {found}",
    )
    assert isinstance(f := match(g, cube, out(g, "q")), Found) and f.scalar("e") == 3.0 and f.node("cube").op == "Pow"
    assert isinstance(f := match(g, cube, out(g, "sq")), Found) and f.node("cube").op == "Mul"
    assert isinstance(m := match(g, cube, out(g, "r")), Miss) and m.reason == "the cube comes from Neg"
    assert isinstance(m := match(g, cube, out(g, "p")), Miss) and m.reason == "a Mul that is not x*x"


def test_const_reads_through_identity_unless_plain_and_not_scalar_refuses_a_constant_scalar(g: Graph) -> None:
    assert isinstance(match(g, Const("eps"), out(g, "eps")), Found)
    assert isinstance(m := match(g, Const("eps", plain=True, why="not plain"), out(g, "eps")), Miss) and m.reason == "not plain"
    scaled = Op("Pow", Var("x"), Var("e", not_scalar=True))
    assert isinstance(match(g, scaled, out(g, "q")), Miss)


def test_onnx_only_refuses_a_custom_domain_node() -> None:
    text = NORM.replace('["" : 17]', '["" : 17, "com.example" : 1]').replace("r = Neg (x)", "r = com.example.Neg (x)")
    graph = Graph.parse(text)
    assert isinstance(match(graph, Op("Neg"), out(graph, "r")), Found)
    assert isinstance(m := match(graph, Op("Neg", onnx_only=True, why="not ONNX's {found}"), out(graph, "r")), Miss)
    assert m.reason == "not ONNX's Neg"


def test_commute_needs_two_operand_patterns() -> None:
    with pytest.raises(ValueError, match="commute needs two operand patterns"):
        Op("Add", Var("x"), commute=True)
