"""Fuse a decomposed LayerNorm into one ``LayerNormalization`` node (opset 17).

    # y = gamma * (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) + beta

TorchScript exports at opset < 17 (GPT-2 among them) spell LayerNorm out as
ReduceMean -> Sub -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul(gamma)
-> Add(beta). The match starts at the Sqrt and accepts these variants:

* ``Mul(d, d)`` for ``Pow(d, 2)``; ``Reciprocal(s)`` or ``Div(1, s)`` then ``Mul``
  for ``Div(d, s)``; either operand order of every Add and Mul;
* float-to-float Casts on any edge inside the pattern (statistics computed in
  float32 around a float16 input, and a Cast back before gamma);
* ReduceMean axes as an attribute (opset < 18) or as an input (opset >= 18);
* constants as initializers, Constant nodes, or Identity copies of either
  (TorchScript reads deduplicated initializers through Identity nodes);
* gamma and beta optional. A Mul or Add after the normalized tensor whose other
  operand is not a constant is not gamma/beta and stays outside the fused node.
  Without gamma the scale is ones of the normalized size, taken from beta or
  from the input's last dimension (declined if neither is known); without beta
  the optional bias input is left out.

The fused node computes its statistics in float32 (``stash_type`` 1, the
default) and runs in the dtype of the pattern's output; when the pattern casts
its input to another float type, or casts an input whose dtype cannot be told,
the fused node gets a Cast in front (in the second case maybe a no-op one).

This module also holds what the norm and activation fusions share: walking
through Casts, reading reduce axes, checking that intermediates are private,
and raising the graph's opset when the fused op is newer than the graph
(:class:`OpsetFusionPass`).

Raising the opset. Only what changed meaning between the graph's opset and the
target is touched: from opset 13 on, raising across 18 moves the ``axes``
attribute of ReduceMean/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare into an
input and gives a Split without a ``split`` input its ``num_outputs``
attribute; a graph below opset 13 (Softmax, Squeeze, Unsqueeze, Split and
ReduceSum all changed at 13) and a graph with DFT, GridSample or
GroupNormalization across their breaking versions is declined with a reason.
The opset is raised only when something is fused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from onnx import TensorProto, helper

from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.pipeline.fusion import FusionPass, Match
from qgraph.pipeline.manager import PassResult

log = logging.getLogger(__name__)

LAYER_NORM_OPSET = 17
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})
#: Reduce ops whose ``axes`` attribute became an input at opset 18 (ReduceSum moved at 13).
REDUCE_AXES_INPUT_AT_18 = frozenset(
    {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
)
#: Ops whose meaning changed at the given opset in a way this module does not convert.
UNCONVERTED_CHANGES = {"DFT": 20, "GridSample": 20, "GroupNormalization": 21}
#: Relative tolerance when comparing a graph's constants with the formula's.
CONST_RTOL = 1e-4
_MAX_CASTS = 4


# ---------------------------------------------------------------- small helpers
def close(value: float, target: float) -> bool:
    """``value`` is ``target`` within CONST_RTOL, or within its dtype's precision (see :class:`Scalar`)."""
    return abs(value - target) <= getattr(value, "rtol", CONST_RTOL) * abs(target)


def const_value(graph: Graph, tensor: Tensor | None) -> np.ndarray | None:
    """:meth:`Graph.const_value`, also through Identity and for Constant nodes with no domain.

    TorchScript exports deduplicate equal initializers and read the copies
    through Identity nodes (a random-weight model's LayerNorm gammas are all
    ones). Workaround: Graph.const_value accepts a Constant node only with
    domain "" or "ai.onnx", but graphsurgeon imports an unset domain (as in
    TorchScript exports) as None; drop that part once it accepts None.
    """
    for _ in range(_MAX_CASTS):
        value = graph.const_value(tensor)
        if value is not None or tensor is None:
            return value
        prod = graph.producer(tensor)
        if prod is None:
            return None
        if prod.op == "Constant" and prod.domain is None and "value" in prod.attrs:
            v = prod.attrs["value"]
            return np.asarray(getattr(v, "values", v))
        if prod.op != "Identity" or not _default_domain(prod):
            return None
        tensor = prod.inputs[0]
    return None


class Scalar(float):
    """A constant scalar's value; ``rtol`` is how closely its dtype can hold a formula's constant."""

    rtol: float = CONST_RTOL


def scalar(graph: Graph, tensor: Tensor | None) -> Scalar | None:
    """The single value of a constant with one element and rank 0 or 1, else None.

    A one-element constant of rank 2 or more is not a scalar: it can broadcast
    the result to a higher rank (x[2, 4] * [[[0.5]]] is [1, 2, 4]), which a
    fused node would not.
    """
    v = const_value(graph, tensor)
    if v is None or v.size != 1 or v.ndim > 1:
        return None
    value = Scalar(float(v.reshape(())))
    try:
        # A float16 graph stores 0.044715 as 0.0447083 (1.5e-4 off).
        value.rtol = max(CONST_RTOL, float(np.finfo(v.dtype).eps))
    except (TypeError, ValueError):
        pass  # an integer constant
    return value


def onnx_dtype(dtype: Any) -> int | None:
    """The TensorProto data type of a graphsurgeon/numpy dtype, or None if unknown."""
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    try:
        return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (TypeError, KeyError, ValueError):
        return None


def np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type))


def dtype_name(onnx_type: int | None) -> str:
    return "unknown" if onnx_type is None else TensorProto.DataType.Name(onnx_type).lower()


# Inputs whose dtype an op's output shares, for the little dtype inference below.
_SAME_DTYPE_INPUTS: dict[str, tuple[int, ...]] = {
    **{op: (0, 1) for op in ("Add", "Sub", "Mul", "Div", "MatMul", "Max", "Min")},
    **{
        op: (0,)
        for op in (
            "Pow",
            "Sqrt",
            "Reciprocal",
            "Neg",
            "Abs",
            "Relu",
            "Tanh",
            "Erf",
            "Exp",
            "Log",
            "Sigmoid",
            "Identity",
            "Reshape",
            "Transpose",
            "Squeeze",
            "Unsqueeze",
            "Flatten",
            "Expand",
            "Slice",
            "Gather",
            "Gemm",
            "Softmax",
            "LayerNormalization",
            "RMSNormalization",
            "Gelu",
            "Dropout",
            "ReduceMean",
            "ReduceSum",
            "ReduceMax",
            "ReduceMin",
            "Split",
            "Tile",
            "Pad",
        )
    },
    "Where": (1, 2),
    "Concat": (0, 1, 2),
}


def tensor_dtype(graph: Graph, tensor: Tensor, depth: int = 8) -> int | None:
    """The tensor's TensorProto dtype: declared, or followed back through a few ops."""
    known = onnx_dtype(tensor.dtype)
    if known is not None or depth == 0:
        return known
    prod = graph.producer(tensor)
    if prod is None:
        return None
    if prod.op == "Cast":
        return int(prod.attrs["to"])
    if prod.op == "Constant":
        v = const_value(graph, tensor)
        return onnx_dtype(v.dtype) if v is not None else None
    for i in _SAME_DTYPE_INPUTS.get(prod.op, ()):
        if i < len(prod.inputs) and prod.inputs[i].name:
            found = tensor_dtype(graph, prod.inputs[i], depth - 1)
            if found is not None:
                return found
    return None


def is_float_cast(node: Node | None) -> bool:
    return node is not None and node.op == "Cast" and int(node.attrs.get("to", 0)) in FLOAT_TYPES


def up_through_casts(graph: Graph, tensor: Tensor) -> tuple[list[Tensor], list[Node]]:
    """``[t, t1, ...]`` and the float-to-float Casts between them: ``casts[i]`` makes ``tensors[i]``.

    A Cast from a tensor known not to be a float (int -> float) is not passed.
    """
    tensors, casts = [tensor], []
    while len(casts) < _MAX_CASTS:
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
    while len(casts) < _MAX_CASTS and len(tensor.outputs) == 1 and not graph.is_graph_output(tensor):
        nxt = tensor.outputs[0]
        if not is_float_cast(nxt):
            break
        casts.append(nxt)
        tensor = nxt.outputs[0]
    return tensor, casts


def norm_match(roles: list[tuple[str, Node]], root: Tensor, aff: Affine, core: RsqrtCore, vectors: Any,
               in_dtype: int | None, out_dtype: int) -> Match:  # fmt: skip
    """The match of a norm fusion (LayerNorm or RMSNorm): its nodes and what rewrite reads."""
    values = {"root": root, "out": aff.out, "eps": core.eps, "in_dtype": in_dtype, "out_dtype": out_dtype, "aff": aff,
              "vectors": vectors}  # fmt: skip
    return Match([n for _, n in roles], values)


def sole_consumer(graph: Graph, tensor: Tensor) -> Node | None:
    """The one consumer of an intermediate tensor (None if several, none, or a graph output)."""
    if len(tensor.outputs) != 1 or graph.is_graph_output(tensor):
        return None
    return tensor.outputs[0]


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
    prod = graph.producer(tensor)
    if prod is not None:
        return f"it comes from {prod.op} '{prod.name}'"
    if any(t is tensor for t in graph.inputs):
        return f"it is the graph input '{tensor.name}'"
    return f"it is '{tensor.name}'"


def rank_of(tensor: Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def last_dim(tensor: Tensor) -> int | None:
    shape = tensor.shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None


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


def leak(graph: Graph, roles: Sequence[tuple[str, Node]], final: Tensor) -> str | None:
    """Why a matched node cannot be fused away (a custom-domain op, or an output other than ``final`` used elsewhere), or None."""
    inside = {id(n) for _, n in roles}
    for role, node in roles:
        if not _default_domain(node):  # com.example.Sqrt is not ONNX's Sqrt: custom ops are left alone
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


# ---------------------------------------------------------------- opset
def _all_nodes(graph: Graph) -> list[Node]:
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


def _default_domain(node: Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


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
    for node in _all_nodes(graph):
        since = UNCONVERTED_CHANGES.get(node.op)
        if since is not None and _default_domain(node) and current < since <= target:
            return f"{op} needs opset {target}, and raising opset {current} would change {node.op} '{node.name}' (changed at opset {since})"
    return None


def raise_opset(graph: Graph, target: int, prefix: str) -> None:
    """Raise the default opset to ``target``, converting the nodes whose signature changed."""
    current = graph.opset() or 1
    if current >= target:
        return
    converted = 0
    if current < 18 <= target:
        for node in _all_nodes(graph):
            if not _default_domain(node):
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


class OpsetFusionPass(FusionPass):
    """A fusion whose fused op needs ``min_opset``: raised once something is fused.

    If the opset cannot be raised safely, every otherwise good match is
    declined with the reason.
    """

    min_opset: ClassVar[int] = 1
    fused_op: ClassVar[str] = ""

    def __init__(self, max_matches: int | None = None) -> None:
        super().__init__(max_matches)
        self._opset_problem: str | None = None

    def run(self, graph: Graph) -> PassResult:
        self._opset_problem = opset_upgrade_problem(graph, self.min_opset, self.fused_op)
        return super().run(graph)

    def prepare(self, graph: Graph) -> None:
        raise_opset(graph, self.min_opset, self.name)


# ---------------------------------------------------------------- the shared norm core
@dataclass
class RsqrtCore:
    """``out = numerator / sqrt(mean(squared^2) + eps)``, matched from its Sqrt.

    ``squared`` and ``numerator`` are the tensors as the Pow/Mul and the Div/Mul
    read them (possibly Casts of the same tensor).
    """

    roles: list[tuple[str, Node]]
    squared: Tensor
    numerator: Tensor
    out: Tensor
    eps: float
    eps_dtype: int | None
    axes: list[int]
    square_node: Node
    norm_node: Node


def match_rsqrt_core(graph: Graph, sqrt: Node) -> RsqrtCore | str:
    """Match ``numerator / sqrt(mean(squared^2) + eps)`` around a Sqrt; the reason if not."""
    roles: list[tuple[str, Node]] = [("sqrt(variance + eps)", sqrt)]
    ve, casts = skip_up(graph, sqrt.inputs[0])
    roles += [("a Cast of variance + eps", c) for c in casts]
    add = graph.producer(ve)
    if add is None or add.op != "Add":
        return f"the Sqrt input comes from {add.op if add else 'no node'}, expected Add(variance, epsilon)"
    roles.append(("variance + eps", add))
    var_side = []
    for i, t in enumerate(add.inputs):
        src, cs = skip_up(graph, t)
        p = graph.producer(src)
        if p is not None and p.op == "ReduceMean":
            var_side.append((i, p, cs))
    if not var_side:
        return "the Add before Sqrt has no ReduceMean operand (expected variance + epsilon)"
    i_var, reduce, casts = var_side[0]
    roles += [("a Cast of the variance", c) for c in casts]
    roles.append(("the variance", reduce))
    eps_t = add.inputs[1 - i_var]
    eps_v = const_value(graph, eps_t)
    if eps_v is None:
        return f"epsilon is not a constant ({describe_source(graph, eps_t)})"
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
    sq, casts = skip_up(graph, reduce.inputs[0])
    roles += [("a Cast of the square", c) for c in casts]
    square = graph.producer(sq)
    if square is None or square.op not in ("Pow", "Mul"):
        return f"the variance ReduceMean reads {square.op if square else 'no node'}, expected Pow(x, 2) or Mul(x, x)"
    if square.op == "Pow":
        e = scalar(graph, square.inputs[1])
        if e is None:
            return "Pow exponent is not a constant scalar"
        if e != 2:
            return f"Pow exponent is {e:g}, expected 2"
    elif square.inputs[0] is not square.inputs[1]:
        return "the Mul before the variance ReduceMean multiplies two different tensors, expected Mul(x, x)"
    roles.append(("the square", square))

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
    return RsqrtCore(roles, square.inputs[0], numerator, norm.outputs[0], eps, onnx_dtype(eps_v.dtype), axes, square, norm)


@dataclass
class Affine:
    """gamma/beta found after a norm's normalized tensor (either may be missing)."""

    roles: list[tuple[str, Node]]
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
        if value is not None:
            aff.gamma, aff.gamma_value = other, value
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


def scale_vector(aff: Affine, rank: int | None, width: int | None) -> tuple[np.ndarray | None, np.ndarray | None, int] | str:
    """Check gamma and beta; returns (gamma vector or None, beta vector or None, normalized size).

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
    return vecs["gamma"], vecs["beta"], next(iter(sizes.values()))


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


# ---------------------------------------------------------------- the pass
class FuseLayerNorm(OpsetFusionPass):
    """Decomposed LayerNorm -> ``LayerNormalization(axis=-1, epsilon)``; see the module docstring."""

    name = "fuse-layer-norm"
    produces = ("layer_norm_fused",)
    invalidates = ("no_dead_nodes",)
    anchors = ("Sqrt",)
    stat = "layer_norm"
    min_opset = LAYER_NORM_OPSET
    fused_op = "LayerNormalization"

    def match(self, graph: Graph, anchor: Node) -> Match | str:
        # y = gamma * (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) + beta
        core = match_rsqrt_core(graph, anchor)
        if isinstance(core, str):
            return core
        roles = list(core.roles)
        d, casts_sq = skip_up(graph, core.squared)
        d_num, casts_num = skip_up(graph, core.numerator)
        sub = graph.producer(d)
        if sub is None or sub.op != "Sub":
            where = f"comes from {sub.op}" if sub else describe_source(graph, d).replace("it ", "", 1)
            return f"the squared tensor {where}, not x - mean(x) (an RMS norm is fuse-rms-norm's)"
        if d_num is not d:
            return "the tensor divided by sqrt(variance + eps) is not the centered x - mean(x) that is squared"
        roles += [("a Cast of x - mean", c) for c in casts_sq]
        roles += [("a Cast of x - mean", c) for c in casts_num if all(c is not o for o in casts_sq)]
        roles.append(("x - mean", sub))
        mean_t, casts_mean = skip_up(graph, sub.inputs[1])
        mean = graph.producer(mean_t)
        if mean is None or mean.op != "ReduceMean":
            return f"the Sub subtracts {mean.op if mean else 'a tensor no node makes'}, expected ReduceMean(x)"
        roles += [("a Cast of the mean", c) for c in casts_mean]
        roles.append(("the mean", mean))
        if (problem := keepdims_problem(mean, "mean")) is not None:
            return problem
        axes = reduce_axes(graph, mean)
        if isinstance(axes, str):
            return axes
        found = common_root(graph, sub.inputs[0], mean.inputs[0], [sub, mean])
        if found is None:
            return "the Sub and the mean's ReduceMean read different tensors"
        root, casts_in = found
        roles += [("a Cast of the input", c) for c in casts_in]
        rank = rank_of(root)
        for ax in (axes, core.axes):
            if (problem := last_axis_problem(ax, rank)) is not None:
                return problem
        if axes != core.axes and not (rank is not None and {a % rank for a in axes} == {a % rank for a in core.axes}):
            return f"the mean reduces over {axes} but the variance over {core.axes}"

        aff = match_affine(graph, core.out, with_beta=True)
        roles += aff.roles
        if (problem := leak(graph, roles, aff.out)) is not None:
            return problem
        vectors = scale_vector(aff, rank, last_dim(root))
        if isinstance(vectors, str):
            return vectors
        has_casts = any(n.op == "Cast" for _, n in roles)
        out_dtype = self._out_dtype(graph, aff, core, has_casts)
        # An input dtype that cannot be told gets a Cast in front (maybe a no-op one).
        in_dtype = tensor_dtype(graph, root) if has_casts else out_dtype
        if out_dtype is None:
            return "the output dtype of the LayerNorm is unknown (the pattern casts, and no gamma or beta gives it)"
        if out_dtype not in FLOAT_TYPES:
            return f"the LayerNorm computes in {dtype_name(out_dtype)}, not a float type"
        if self._opset_problem:
            return self._opset_problem
        return norm_match(roles, root, aff, core, vectors, in_dtype, out_dtype)

    @staticmethod
    def _out_dtype(graph: Graph, aff: Affine, core: RsqrtCore, has_casts: bool) -> int | None:
        for value in (aff.beta_value, aff.gamma_value):
            if value is not None:
                return onnx_dtype(value.dtype)
        if aff.out_cast is not None:
            return aff.out_cast
        if not has_casts:
            return core.eps_dtype
        return tensor_dtype(graph, aff.out)

    def rewrite(self, graph: Graph, m: Match) -> None:
        v = m.values
        aff: Affine = v["aff"]
        gamma, beta, size = v["vectors"]
        out_dtype: int = v["out_dtype"]
        prev = last_in_order(graph, m.nodes)
        x = v["root"]
        if v["in_dtype"] != out_dtype:
            prev = graph.add_node("Cast", [x], 1, {"to": out_dtype}, prefix=self.name, after=prev)
            x = prev.outputs[0]
        inputs = [x, scale_input(graph, self.name, aff.gamma, aff.gamma_value, gamma, size, out_dtype, 1.0)]
        if aff.beta is not None:
            inputs.append(scale_input(graph, self.name, aff.beta, aff.beta_value, beta, size, out_dtype, 0.0))
        graph.add_node("LayerNormalization", inputs, [v["out"]], {"axis": -1, "epsilon": float(v["eps"])}, prefix=self.name, after=prev)
        graph.remove_nodes(m.nodes)
