"""Fuse a decomposed RMSNorm into one ``RMSNormalization`` node (opset 23).

    # y = gamma * x / sqrt(mean(x^2) + eps)

The match starts at the Sqrt, like fuse-layer-norm's, and accepts ``Pow(x, 2)``
or ``Mul(x, x)``; ``Div(x, s)``, ``Mul(x, Reciprocal(s))`` or ``Mul(x, Div(1, s))``
(TorchScript's rsqrt); either operand order; float Casts inside the pattern,
as LLaMA's RMSNorm does (``x.to(float32)`` ... ``.to(input_dtype) * weight``);
ReduceMean axes as attribute or input. gamma is optional (ones of the
normalized size when the input's last dimension is known), and may be the sum
of two constants, as Gemma's ``x * (1 + weight)`` (through a Cast of the
weight): the sum becomes the fused node's scale.

The fused node always computes in float32 or wider: a float16/bfloat16 input
(or one whose dtype cannot be told) is Cast to float32 in front and the result
Cast back to the pattern's output dtype, so a target that ignores
``stash_type`` cannot overflow in x^2. A centered input, ``x - mean(x)``, is a
LayerNorm and is left to fuse-layer-norm.
"""

from __future__ import annotations

from onnx import TensorProto

from passes.constants import FLOAT_TYPES
from passes.dtypes import dtype_name, onnx_dtype, tensor_dtype
from passes.matching import Role, common_root, last_in_order, leak
from passes.norms import Affine, NormMatch, RsqrtCore, last_axis_problem, match_affine, match_rsqrt_core, scale_input, scale_vector
from passes.opset import OpsetFusionPass
from passes.pattern import Found, Op, Var, match
from passes.shapes import last_dim, rank_of
from qgraph.ir.graph import Graph, Node, Tensor

RMS_NORM_OPSET = 23
# x - mean(x) (through float Casts): a LayerNorm's input, not an RMS norm's
CENTERED_INPUT = Op("Sub", Var(), Op("ReduceMean", casts="a Cast"), casts="a Cast")


class FuseRmsNorm(OpsetFusionPass[NormMatch]):
    """Decomposed RMSNorm -> ``RMSNormalization(axis=-1, epsilon, stash_type=1)``."""

    name = "fuse-rms-norm"
    produces = ("rms_norm_fused",)
    anchors = ("Sqrt",)
    stat = "rms_norm"
    min_opset = RMS_NORM_OPSET
    fused_op = "RMSNormalization"

    def match(self, graph: Graph, anchor: Node) -> NormMatch | str:
        # y = gamma * x / sqrt(mean(x^2) + eps)
        core = match_rsqrt_core(graph, anchor)
        if isinstance(core, str):
            return core
        roles = list(core.roles)
        found = common_root(graph, core.squared, core.numerator, [core.square_node, core.norm_node])
        if found is None:
            return "the tensor divided by sqrt(mean(x^2) + eps) is not the tensor that is squared"
        root, casts_in = found
        roles += [("a Cast of the input", c) for c in casts_in]
        if isinstance(match(graph, CENTERED_INPUT, root), Found):
            return "the input is x - mean(x): this is a LayerNorm, left to fuse-layer-norm"
        rank = rank_of(root)
        if (problem := last_axis_problem(core.axes, rank)) is not None:
            return problem

        aff = match_affine(graph, core.out, with_beta=False)
        return self.check(graph, roles + aff.roles, root, core, aff)

    def check(self, graph: Graph, roles: list[Role], root: Tensor, core: RsqrtCore, aff: Affine) -> NormMatch | str:
        """The site as a match if it can be fused (nothing leaks, gamma fits, a float dtype, the opset), else the reason."""
        if (problem := leak(graph, roles, aff.out)) is not None:
            return problem
        vectors = scale_vector(aff, rank_of(root), last_dim(root))
        if isinstance(vectors, str):
            return vectors
        has_casts = any(n.op == "Cast" for _, n in roles)
        in_dtype = tensor_dtype(graph, root) if has_casts else core.eps_dtype
        if aff.gamma_value is not None:
            out_dtype = onnx_dtype(aff.gamma_value.dtype)
        elif aff.out_cast is not None:
            out_dtype = aff.out_cast
        else:
            out_dtype = tensor_dtype(graph, aff.out) if has_casts else in_dtype
        # An input dtype that cannot be told is cast to float32 (maybe a no-op Cast).
        if out_dtype is None:
            return "the output dtype of the RMS norm is unknown (the pattern casts, and no gamma gives it)"
        if out_dtype not in FLOAT_TYPES:
            return f"the RMS norm outputs {dtype_name(out_dtype)}, not a float type"
        if self.opset_problem:
            return self.opset_problem
        return NormMatch(nodes=[n for _, n in roles], root=root, out=aff.out, eps=core.eps, in_dtype=in_dtype, out_dtype=out_dtype,
                         affine=aff, vectors=vectors)  # fmt: skip

    def rewrite(self, graph: Graph, m: NormMatch) -> None:
        # Compute in float32 at least: x^2 overflows float16 above 256.
        compute = m.in_dtype if m.in_dtype in (TensorProto.FLOAT, TensorProto.DOUBLE) else TensorProto.FLOAT
        prev = last_in_order(graph, m.nodes)
        x = m.root
        if m.in_dtype != compute:
            prev = graph.add_node("Cast", [x], 1, {"to": compute}, prefix=self.name, after=prev)
            x = prev.outputs[0]
        scale = scale_input(graph, self.name, m.affine.gamma, m.affine.gamma_value, m.vectors.gamma, m.vectors.size, compute, 1.0)
        attrs = {"axis": -1, "epsilon": float(m.eps), "stash_type": 1}
        if m.out_dtype == compute:
            graph.add_node("RMSNormalization", [x, scale], [m.out], attrs, prefix=self.name, after=prev)
        else:
            norm = graph.add_node("RMSNormalization", [x, scale], 1, attrs, prefix=self.name, after=prev)
            graph.add_node("Cast", norm.outputs, [m.out], {"to": m.out_dtype}, prefix=self.name, after=norm)
        graph.remove_nodes(m.nodes)
