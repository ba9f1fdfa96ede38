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

The opset is raised to 17 when something is fused (see :mod:`passes.opset`).
"""

from __future__ import annotations

from passes.constants import FLOAT_TYPES
from passes.dtypes import dtype_name, onnx_dtype, tensor_dtype
from passes.matching import Role, common_root, describe_source, last_in_order, leak, skip_up
from passes.norms import (
    Affine,
    NormMatch,
    RsqrtCore,
    keepdims_problem,
    last_axis_problem,
    match_affine,
    match_rsqrt_core,
    reduce_axes,
    scale_input,
    scale_vector,
)
from passes.opset import OpsetFusionPass
from passes.pattern import Miss, Op, Var, match
from passes.shapes import last_dim, rank_of
from qgraph.ir.graph import Graph, Node, Tensor

LAYER_NORM_OPSET = 17


def _not_centered(graph: Graph, d: Tensor, prod: Node | None) -> str:
    where = f"comes from {prod.op}" if prod else describe_source(graph, d).replace("it ", "", 1)
    return f"the squared tensor {where}, not x - mean(x) (an RMS norm is fuse-rms-norm's)"


# x - mean(x), reached from the tensor the variance squares (through float Casts)
CENTERED = Op("Sub", name="sub", role="x - mean", casts="a Cast of x - mean", why=_not_centered)
# mean(x), the Sub's second operand (through float Casts)
MEAN = Op("ReduceMean", Var("x"), name="mean", role="the mean", casts="a Cast of the mean",
          why="the Sub subtracts {found}, expected ReduceMean(x)", missing="a tensor no node makes")  # fmt: skip


class FuseLayerNorm(OpsetFusionPass[NormMatch]):
    """Decomposed LayerNorm -> ``LayerNormalization(axis=-1, epsilon)``; see the module docstring."""

    name = "fuse-layer-norm"
    produces = ("layer_norm_fused",)
    invalidates = ("no_dead_nodes",)
    anchors = ("Sqrt",)
    stat = "layer_norm"
    min_opset = LAYER_NORM_OPSET
    fused_op = "LayerNormalization"

    def match(self, graph: Graph, anchor: Node) -> NormMatch | str:
        # y = gamma * (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) + beta
        core = match_rsqrt_core(graph, anchor)
        if isinstance(core, str):
            return core
        roles = list(core.roles)
        centered = match(graph, CENTERED, core.squared)
        if isinstance(centered, Miss):
            return centered.reason
        sub = centered.node("sub")
        d_num, casts_num = skip_up(graph, core.numerator)
        if d_num is not sub.outputs[0]:
            return "the tensor divided by sqrt(variance + eps) is not the centered x - mean(x) that is squared"
        *cast_roles, sub_role = centered.roles
        # The numerator reaches the same Sub, maybe through Casts of its own.
        roles += cast_roles + [("a Cast of x - mean", c) for c in casts_num if all(c is not o for _, o in cast_roles)] + [sub_role]
        mean_found = match(graph, MEAN, sub.inputs[1])
        if isinstance(mean_found, Miss):
            return mean_found.reason
        roles += mean_found.roles
        mean = mean_found.node("mean")
        if (problem := keepdims_problem(mean, "mean")) is not None:
            return problem
        axes = reduce_axes(graph, mean)
        if isinstance(axes, str):
            return axes
        found = common_root(graph, sub.inputs[0], mean_found.tensor("x"), [sub, mean])
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
        return self.check(graph, roles + aff.roles, root, core, aff)

    def check(self, graph: Graph, roles: list[Role], root: Tensor, core: RsqrtCore, aff: Affine) -> NormMatch | str:
        """The site as a match if it can be fused (nothing leaks, gamma and beta fit, a float dtype, the opset), else the reason."""
        if (problem := leak(graph, roles, aff.out)) is not None:
            return problem
        vectors = scale_vector(aff, rank_of(root), last_dim(root))
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
        if self.opset_problem:
            return self.opset_problem
        return NormMatch(nodes=[n for _, n in roles], root=root, out=aff.out, eps=core.eps, in_dtype=in_dtype, out_dtype=out_dtype,
                         affine=aff, vectors=vectors)  # fmt: skip

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

    def rewrite(self, graph: Graph, m: NormMatch) -> None:
        aff, vec = m.affine, m.vectors
        prev = last_in_order(graph, m.nodes)
        x = m.root
        if m.in_dtype != m.out_dtype:
            prev = graph.add_node("Cast", [x], 1, {"to": m.out_dtype}, prefix=self.name, after=prev)
            x = prev.outputs[0]
        inputs = [x, scale_input(graph, self.name, aff.gamma, aff.gamma_value, vec.gamma, vec.size, m.out_dtype, 1.0)]
        if aff.beta is not None:
            inputs.append(scale_input(graph, self.name, aff.beta, aff.beta_value, vec.beta, vec.size, m.out_dtype, 0.0))
        graph.add_node("LayerNormalization", inputs, [m.out], {"axis": -1, "epsilon": float(m.eps)}, prefix=self.name, after=prev)
        graph.remove_nodes(m.nodes)
