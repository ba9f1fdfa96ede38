"""Legalize for QNN HTP, on the simplified layouts: a head merge at one token that the HTP computes wrongly.

At one token, attention's output [B, H, 1, D] is merged into rows [B, 1, H*D] for the output projection. The
exporters write ``Reshape(Transpose(x, [0, 2, 1, 3]), [B, 1, H*D])``; simplify-shapes turns the unit Transpose into
a Reshape and merges the two. Measured on the HTP simulator (onnxruntime-qnn 2.7.0, QNN SDK 2.51), that one
``Reshape`` from [B, H, 1, D] to [B, 1, H*D] read by a ``MatMul`` gives wrong results whenever B == H (logits off by
about their own size, from the first decode step of a model whose head count equals the batch size; B = H = 2, 3,
4 all failed), and right ones when B != H; the Reshape alone, or read by an ``Add``, is right, and so is a Reshape
to [B, H*D]. So here, on the qnn target only, such a merge gets its Transpose back::

    # Reshape(x[B, H, 1, D], [B, 1, H*D])  ->  Reshape(Transpose(x, [0, 2, 1, 3]), [B, 1, H*D])   exact, B == H > 1

Only where B == H > 1 (the measured failure): elsewhere the graph keeps the merged Reshape. It runs in the qnn
target's final slot, after simplify-shapes.
"""

from __future__ import annotations

import logging

from qgraph.ir.graph import Graph, Node
from qgraph.ir.validate import is_onnx_op
from qgraph.pipeline.manager import Pass, PassResult

log = logging.getLogger(__name__)


def _static(shape: object) -> list[int] | None:
    if shape is None:
        return None
    dims = list(shape)  # type: ignore[call-overload]
    return dims if all(isinstance(d, int) for d in dims) else None


class LegalizeQnnLayout(Pass):
    """Give the HTP's miscomputed head merge its Transpose back (see the module docstring)."""

    name = "legalize-qnn-layout"
    produces = ("qnn_head_merges_legal",)

    def run(self, graph: Graph) -> PassResult:
        count = 0
        reshapes = [n for n in graph.nodes if is_onnx_op(n, "Reshape")]
        graph.infer_shapes_if_missing([t for n in reshapes for t in (n.inputs[0], n.outputs[0])], self.name)  # pinned: no-op
        for node in [n for n in graph.nodes if is_onnx_op(n, "Reshape")]:
            if self._is_square_head_merge(node):
                x = node.inputs[0]
                b, h, _, d = _static(x.shape)  # type: ignore[misc]
                moved = graph.variable(self.name, x.dtype, [b, 1, h, d])
                graph.add_node("Transpose", [x], [moved], {"perm": [0, 2, 1, 3]}, prefix=self.name, before=node)
                node.inputs[0] = moved
                count += 1
        stats = {"head_merges_transposed": count} if count else {}
        log.info("%s: %s", self.name, stats or "no head merge to legalize")
        return PassResult(graph, bool(count), stats)

    @staticmethod
    def _is_square_head_merge(node: Node) -> bool:
        """``Reshape(x[B, H, 1, D]) -> [B, 1, H*D]`` with B == H > 1, read by a MatMul (static shapes)."""
        if not is_onnx_op(node, "Reshape") or not node.outputs:
            return False
        src, out = _static(node.inputs[0].shape), _static(node.outputs[0].shape)
        if src is None or out is None or len(src) != 4 or len(out) != 3:
            return False
        b, h, one, d = src
        if one != 1 or b != h or b < 2 or out != [b, 1, h * d]:
            return False
        return any(is_onnx_op(c, "MatMul", "Gemm") for c in node.outputs[0].outputs)
