"""The core both norm fusions match: ``numerator / sqrt(mean(squared^2) + eps)`` around a Sqrt, the
gamma/beta after it, and the scale vectors of the fused node.

    # LayerNorm: y = gamma * (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) + beta
    # RMSNorm:   y = gamma * x / sqrt(mean(x^2) + eps)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from passes.const_values import const_value, default_domain, scalar
from passes.dtypes import np_dtype, onnx_dtype
from passes.matching import Role, describe_source, other_input, skip_down, sole_consumer
from passes.pattern import Const, Miss, Op, Or, Var, match, match_node
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.pipeline.fusion import Match


def reduce_axes(graph: Graph, node: Node) -> list[int] | str:
    """The axes of a Reduce node, from its input (opset >= 18) or attribute; else why not."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = const_value(graph, node.inputs[1])
        if v is None:
            return f"{node.op} axes are not a constant ({describe_source(graph, node.inputs[1])})"
        axes = [int(a) for a in v.reshape(-1)]
    elif "axes" in node.attrs:
        axes = [int(a) for a in node.attrs["axes"]]
    else:
        axes = []
    if not axes:
        return f"{node.op} reduces over all axes, expected the last axis"
    return axes


def last_axis_problem(axes: Sequence[int], rank: int | None) -> str | None:
    """None if ``axes`` is just the last axis, else the reason."""
    if len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1)):
        return None
    if len(axes) == 1 and axes[0] >= 0 and rank is None:
        return f"ReduceMean axes {list(axes)} may not be the last axis (the input rank is unknown)"
    return f"ReduceMean axes {list(axes)} are not the last axis"


def keepdims_problem(node: Node, what: str) -> str | None:
    if int(node.attrs.get("keepdims", 1)) != 1:
        return f"the {what} ReduceMean has keepdims=0, expected 1"
    return None


def per_feature(value: np.ndarray, rank: int | None, what: str) -> np.ndarray | str:
    """A gamma/beta constant as a 1-D vector (or one value), or why it is not one.

    Leading 1 dimensions are dropped when they cannot change the output's rank.
    """
    v = value
    while v.ndim > 1 and v.shape[0] == 1:
        v = v[0]
    if value.ndim > 1 and (rank is None or value.ndim > rank):
        return f"{what} has shape {list(value.shape)} and the input rank is {'unknown' if rank is None else rank}"
    if v.size == 1:
        return v.reshape(())
    if v.ndim != 1:
        return f"{what} has shape {list(value.shape)}, expected one value per normalized element"
    return v


@dataclass
class RsqrtCore:
    """``out = numerator / sqrt(mean(squared^2) + eps)``, matched from its Sqrt.

    ``squared`` and ``numerator`` are the tensors as the Pow/Mul and the Div/Mul
    read them (possibly Casts of the same tensor).
    """

    roles: list[Role]
    squared: Tensor
    numerator: Tensor
    out: Tensor
    eps: float
    eps_dtype: int | None
    axes: list[int]
    square_node: Node
    norm_node: Node


# sqrt(variance + eps), variance = ReduceMean(...): the Add's operands in either order, float Casts on each edge but epsilon's
SQRT_OF_VARIANCE = Op(
    "Sqrt",
    Op("Add",
       Op("ReduceMean", name="variance", role="the variance", casts="a Cast of the variance",
          why="the Add before Sqrt has no ReduceMean operand (expected variance + epsilon)"),
       Const("eps", why="epsilon is not a constant ({source})"),
       commute=True, role="variance + eps", casts="a Cast of variance + eps",
       why="the Sqrt input comes from {found}, expected Add(variance, epsilon)"),
    role="sqrt(variance + eps)",
)  # fmt: skip
# the square the variance averages: x^2 as Pow(x, 2) or Mul(x, x), through float Casts
SQUARE = Or(
    Op("Pow", Var("x"), Const("exponent", scalar=True, why="Pow exponent is not a constant scalar"), name="square", role="the square"),
    Op("Mul", Var("x"), Var("x", why="the Mul before the variance ReduceMean multiplies two different tensors, expected Mul(x, x)"),
       name="square", role="the square"),
    casts="a Cast of the square",
    why="the variance ReduceMean reads {found}, expected Pow(x, 2) or Mul(x, x)",
)  # fmt: skip


def match_rsqrt_core(graph: Graph, sqrt: Node) -> RsqrtCore | str:
    """Match ``numerator / sqrt(mean(squared^2) + eps)`` around a Sqrt; the reason if not."""
    found = match_node(graph, SQRT_OF_VARIANCE, sqrt)
    if isinstance(found, Miss):
        return found.reason
    roles = found.roles
    eps_v, reduce = found.value("eps"), found.node("variance")
    if eps_v.size != 1 or eps_v.ndim > 1:  # rank > 1 could broadcast the output to a higher rank
        return f"epsilon is not a constant scalar (shape {list(eps_v.shape)})"
    eps = float(eps_v.reshape(()))
    if not np.isfinite(eps) or eps < 0:
        return f"epsilon {eps:g} is not a finite non-negative number"
    if (problem := keepdims_problem(reduce, "variance")) is not None:
        return problem
    axes = reduce_axes(graph, reduce)
    if isinstance(axes, str):
        return axes
    squared = match(graph, SQUARE, reduce.inputs[0])
    if isinstance(squared, Miss):
        return squared.reason
    square = squared.node("square")
    if square.op == "Pow" and (e := squared.scalar("exponent")) != 2:
        return f"Pow exponent is {e:g}, expected 2"
    roles += squared.roles

    s, casts = skip_down(graph, sqrt.outputs[0])
    roles += [("a Cast of sqrt(variance + eps)", c) for c in casts]
    nxt = sole_consumer(graph, s)
    if nxt is None:
        return f"sqrt(variance + eps) has {len(s.outputs)} consumers{' and is a graph output' if graph.is_graph_output(s) else ''}, expected one Div or Reciprocal"
    recip: Node | None = None
    if nxt.op == "Div" and nxt.inputs[1] is s and nxt.inputs[0] is not s:
        if scalar(graph, nxt.inputs[0]) == 1.0:
            recip = nxt  # Div(1, s), as TorchScript exports rsqrt
        else:
            norm, numerator = nxt, nxt.inputs[0]
    elif nxt.op == "Reciprocal":
        recip = nxt
    else:
        return f"sqrt(variance + eps) feeds {nxt.op}, expected Div(x, sqrt) or Reciprocal"
    if recip is not None:
        roles.append(("1/sqrt(variance + eps)", recip))
        r, casts = skip_down(graph, recip.outputs[0])
        roles += [("a Cast of 1/sqrt(variance + eps)", c) for c in casts]
        nxt = sole_consumer(graph, r)
        if nxt is None or nxt.op != "Mul":
            return f"1/sqrt(variance + eps) feeds {nxt.op if nxt else f'{len(r.outputs)} nodes'}, expected one Mul"
        norm, numerator = nxt, other_input(nxt, r)
    roles.append(("the normalized tensor", norm))
    return RsqrtCore(roles, squared.tensor("x"), numerator, norm.outputs[0], eps, onnx_dtype(eps_v.dtype), axes, square, norm)


def constant_sum(graph: Graph, tensor: Tensor) -> np.ndarray | None:
    """The value of ``Add(a, b)`` of two constants (through Casts), as Gemma's RMSNorm scales by ``1 + weight``
    (``weight.float()`` in fp16); None if ``tensor`` is anything else."""
    node = graph.producer(tensor)
    if node is None or node.op != "Add" or not default_domain(node):
        return None
    values = [cast_constant(graph, x) for x in node.inputs]
    if any(v is None for v in values):
        return None
    return np.add(*values)


def cast_constant(graph: Graph, tensor: Tensor) -> np.ndarray | None:
    """A constant's value, also through one Cast (in that Cast's type)."""
    value = const_value(graph, tensor)
    node = graph.producer(tensor)
    if value is None and node is not None and node.op == "Cast" and default_domain(node):
        inner = const_value(graph, node.inputs[0])
        value = None if inner is None else inner.astype(np_dtype(int(node.attrs["to"])))
    return value


@dataclass
class Affine:
    """gamma/beta found after a norm's normalized tensor (either may be missing)."""

    roles: list[Role]
    out: Tensor
    gamma: Tensor | None = None
    gamma_value: np.ndarray | None = None
    beta: Tensor | None = None
    beta_value: np.ndarray | None = None
    out_cast: int | None = None  # the dtype of a trailing Cast, when one was taken


def match_affine(graph: Graph, normalized: Tensor, *, with_beta: bool) -> Affine:
    """Take ``Mul(., gamma)`` (and ``Add(., beta)``) after ``normalized``, through Casts.

    Only a Mul/Add with a constant operand counts; Casts are taken only when a
    gamma or beta follows them.
    """
    aff = Affine([], normalized)
    t, casts = skip_down(graph, normalized)
    nxt = sole_consumer(graph, t)
    if nxt is not None and nxt.op == "Mul":
        other = other_input(nxt, t)
        value = const_value(graph, other) if other is not t else None
        gamma: Tensor | None = other
        if value is None and other is not t:
            value, gamma = constant_sum(graph, other), None  # a new constant holds it (scale_input)
        if value is not None:
            aff.gamma, aff.gamma_value = gamma, value
            aff.roles.append(("the normalized tensor times gamma", nxt))
            t = nxt.outputs[0]
            nxt = sole_consumer(graph, t)
    if with_beta and nxt is not None and nxt.op == "Add":
        other = other_input(nxt, t)
        value = const_value(graph, other) if other is not t else None
        if value is not None:
            aff.beta, aff.beta_value = other, value
            aff.roles.append(("the output before beta", nxt))
            t = nxt.outputs[0]
    if aff.roles:
        aff.roles = [("a Cast of the normalized tensor", c) for c in casts] + aff.roles
        aff.out = t
        if casts:
            aff.out_cast = int(casts[-1].attrs["to"])
    return aff


@dataclass
class ScaleVectors:
    """gamma and beta as vectors (or one value, or None when missing), and the normalized size."""

    gamma: np.ndarray | None
    beta: np.ndarray | None
    size: int


def scale_vector(aff: Affine, rank: int | None, width: int | None) -> ScaleVectors | str:
    """Check gamma and beta and find the normalized size; the reason if they do not fit.

    The fused node's scale is a vector of the normalized size, so that size
    must be known: from a gamma or beta vector, or the input's last dimension.
    """
    vecs: dict[str, np.ndarray | None] = {}
    for what, value in (("gamma", aff.gamma_value), ("beta", aff.beta_value)):
        vec = per_feature(value, rank, what) if value is not None else None
        if isinstance(vec, str):
            return vec
        vecs[what] = vec
    sizes = {what: int(v.size) for what, v in vecs.items() if v is not None and v.ndim == 1}
    if width is not None:
        sizes["the input's last dimension"] = width
    if len(set(sizes.values())) > 1:
        return "the normalized sizes disagree: " + ", ".join(f"{k} has {v}" for k, v in sizes.items())
    if not sizes:
        return "the normalized size is unknown (no gamma or beta vector, and the input's last dimension is not known), so no scale can be built"
    return ScaleVectors(vecs["gamma"], vecs["beta"], next(iter(sizes.values())))


def scale_input(
    graph: Graph, prefix: str, tensor: Tensor | None, value: np.ndarray | None, vec: np.ndarray | None, size: int, dtype: int, fill: float
) -> Tensor:
    """A fused node's scale/bias: the original tensor when it already is a [size] vector of ``dtype``, else a new constant."""
    want = np_dtype(dtype)
    if tensor is not None and value is not None and value.shape == (size,) and value.dtype == want:
        return tensor
    if vec is None or vec.ndim == 0:
        return graph.constant(prefix, np.full(size, fill if vec is None else vec, dtype=want))
    return graph.constant(prefix, vec.astype(want))


@dataclass(kw_only=True)
class NormMatch(Match):
    """A norm fusion's site (LayerNorm or RMSNorm): what its rewrite reads."""

    root: Tensor  # the input x
    out: Tensor  # the pattern's output, which the fused node writes
    eps: float
    in_dtype: int | None  # x's dtype as the pattern reads it (None: not known)
    out_dtype: int
    affine: Affine
    vectors: ScaleVectors
