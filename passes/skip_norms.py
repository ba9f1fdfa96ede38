"""What fuse-skip-layer-norm and fuse-skip-rms-norm share: a residual Add and the norm that reads it, as one
ONNX Runtime contrib op (the sum kept as its output 3 when anything else reads it).

    s = Add(a, b)                       y, _, _, s = SkipLayerNormalization(a, b, gamma, beta)
    y = Norm(s, gamma (, beta))   ->                 SkipSimplifiedLayerNormalization(a, b, gamma)

Declined, with a reason: operands of different or unknown shapes (the ops take
no broadcasting here), a non-float32 sum, a norm over more than the last axis,
a norm that also writes its mean or inverse deviation, gamma or beta that are
not 1-D of the hidden size, and custom-domain look-alikes. A Cast to float32 of
a float32 sum between the Add and the norm (TorchScript's export of HF's
``.to(float32)``) is looked through.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

from passes.constants import MS_DOMAIN, MS_VERSION
from passes.dtypes import tensor_dtype
from passes.pattern import Miss, Op, Var, match
from passes.shapes import static_dims
from qgraph.ir.graph import Graph, Node
from qgraph.ir.validate import is_onnx_op
from qgraph.pipeline.fusion import FusionPass, Match
from qgraph.pipeline.manager import PassResult

# s = a + b, the norm's input
RESIDUAL_SUM = Op("Add", Var("a"), Var("b"), name="add", onnx_only=True, why="the norm's input is not an Add")


@dataclass(kw_only=True)
class SkipLayerNormMatch(Match):
    """The Add and the norm (``nodes``), and whether anything else reads the sum (it becomes output 3)."""

    add: Node
    norm: Node
    sum_used: bool


class SkipNormFusion(FusionPass[SkipLayerNormMatch]):
    """Add + a norm over the last axis -> the contrib op that takes both (each pass names them: ``norm_op``, ``fused_op``)."""

    requires = ("static_shapes",)
    #: The norm matched (the anchor) and the contrib op it becomes.
    norm_op = "LayerNormalization"
    fused_op = "SkipLayerNormalization"

    def run(self, graph: Graph) -> PassResult:
        graph.infer_shapes_if_missing((n.outputs[0] for n in graph.nodes if n.op == "Add" and n.outputs), self.name)
        return super().run(graph)

    def prepare(self, graph: Graph) -> None:
        graph.import_domain(MS_DOMAIN, MS_VERSION)

    def match(self, graph: Graph, anchor: Node) -> SkipLayerNormMatch | str:
        # y = LayerNorm(a + b)
        if not is_onnx_op(anchor, self.norm_op):
            return f"a custom-domain op named {self.norm_op}"
        if len([t for t in anchor.outputs if t.name]) != 1:
            return "the norm also writes its mean or inverse deviation"
        s = anchor.inputs[0]
        # A Cast to float32 of a float32 sum changes nothing (TorchScript's export writes HF's .to(float32) so): the
        # norm reads the sum; the Cast goes with it when nothing else reads it, else it stays, reading the fused sum.
        cast = graph.producer(s)
        if (cast is not None and is_onnx_op(cast, "Cast") and int(cast.attrs.get("to", 0)) == TensorProto.FLOAT
                and tensor_dtype(graph, cast.inputs[0]) == TensorProto.FLOAT):  # fmt: skip
            drop_cast = len(s.outputs) == 1 and not graph.is_graph_output(s)
            s = cast.inputs[0]
        else:
            cast, drop_cast = None, False
        found = match(graph, RESIDUAL_SUM, s)
        if isinstance(found, Miss):
            return found.reason
        add, a, b = found.node("add"), found.tensor("a"), found.tensor("b")
        shape = static_dims(s.shape)
        if shape is None or not shape or static_dims(a.shape) != shape or static_dims(b.shape) != shape:
            return f"the Add's operands do not have one static shape ({a.shape} and {b.shape})"
        if len(shape) not in (2, 3):
            return f"the sum has rank {len(shape)}; the fused op takes 2-D or 3-D"
        if any(tensor_dtype(graph, t) != TensorProto.FLOAT for t in (a, b, s)):
            return "the sum is not float32"
        axis = int(anchor.attrs.get("axis", -1))
        if axis not in (-1, len(shape) - 1):
            return f"the norm is over the axes from {axis}, not the last axis alone"
        hidden = shape[-1]
        for role, t in zip(("gamma", "beta"), anchor.inputs[1:3]):
            if not t.name:
                continue
            value = graph.const_value(t)  # a Constant node's output may carry no shape
            dims = list(value.shape) if value is not None else static_dims(t.shape)
            if dims != [hidden]:
                return f"{role} has shape {dims}, not [{hidden}]"
        readers = [n for n in s.outputs if n is not (cast if drop_cast else anchor)]  # what still reads the sum
        nodes = [add, *([cast] if drop_cast else []), anchor]
        return SkipLayerNormMatch(nodes=nodes, add=add, norm=anchor, sum_used=graph.is_graph_output(s) or bool(readers))

    def rewrite(self, graph: Graph, m: SkipLayerNormMatch) -> None:
        add, norm = m.add, m.norm
        s = add.outputs[0]
        ins = [add.inputs[0], add.inputs[1], norm.inputs[1]]
        if len(norm.inputs) > 2 and norm.inputs[2].name:
            ins.append(norm.inputs[2])
        outs = [norm.outputs[0], graph.omitted(), graph.omitted(), s] if m.sum_used else [norm.outputs[0]]
        eps = float(norm.attrs.get("epsilon", 1e-5))
        graph.add_node(self.fused_op, ins, outs, {"epsilon": eps}, prefix=self.name, domain=MS_DOMAIN, after=norm)
        graph.remove_nodes(m.nodes)
