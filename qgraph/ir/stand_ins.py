"""Shape inference through ONNX Runtime's weight-only quantized ops.

ONNX's shape inference knows no ``com.microsoft`` op, so it stops at one: every tensor past a ``MatMulNBits`` or a
``GatherBlockQuantized`` keeps no shape, and a graph quantized before its shapes were pinned (``qgraph optimize
--quantize``, then ``qgraph compile``) could not be pinned. For the inference only, each such node is replaced by
standard ops that give its outputs the same type and shape, reading a weight of the right shape made by ``Expand``
(a few bytes; ``data_prop`` gives ``Expand`` its shape):

    MatMulNBits(a, ...)             (K, N attributes)  ->  MatMul(a, Expand(0, [K, N]))
    GatherBlockQuantized(d, i, s)   (gather axis 0)    ->  Gather(Expand(0, [rows, K]), i)

The nodes are put back after the inference; only the shapes stay.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import TensorProto, helper

MS = "com.microsoft"
#: Names of the stand-ins' own tensors and nodes.
PREFIX = "__stand_in__/"


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of each initializer and graph input (the weight-side inputs of quantized ops are initializers)."""
    types = {t.name: t.data_type for t in graph.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in graph.input})
    return types


def _dims(graph: onnx.GraphProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in graph.initializer}


def _weight(name: str, elem_type: int, shape: list[int]) -> list[onnx.NodeProto]:
    """Nodes making ``name``: zeros of ``shape`` by Expand (no data stored)."""
    zero, dims = f"{name}/zero", f"{name}/shape"
    return [
        helper.make_node("Constant", [], [zero], name=zero, value=helper.make_tensor(zero, elem_type, [], [0])),
        helper.make_node("Constant", [], [dims], name=dims, value=helper.make_tensor(dims, TensorProto.INT64, [len(shape)], shape)),
        helper.make_node("Expand", [zero, dims], [name], name=name),
    ]


def _stand_in(node: onnx.NodeProto, index: int, types: dict[str, int], dims: dict[str, list[int]]) -> list[onnx.NodeProto] | None:
    """Standard nodes with ``node``'s outputs, types and shapes; None for a node this module does not know."""
    if node.domain != MS:
        return None
    attrs, tag = _attrs(node), f"{PREFIX}{index}"
    if node.op_type == "MatMulNBits" and len(node.input) >= 3 and node.input[2] in types:
        k, n = int(attrs["K"]), int(attrs["N"])  # type: ignore[call-overload]
        return [*_weight(f"{tag}/w", types[node.input[2]], [k, n]),
                helper.make_node("MatMul", [node.input[0], f"{tag}/w"], [node.output[0]], name=tag)]  # fmt: skip
    if node.op_type == "GatherBlockQuantized" and attrs.get("gather_axis", 0) == 0 and len(node.input) >= 3:
        data, scales = dims.get(node.input[0]), node.input[2]
        if data is None or len(data) != 2 or scales not in types or attrs.get("quantize_axis", 1) not in (1, -1):
            return None
        bits = int(attrs.get("bits", 4))  # type: ignore[call-overload]
        packed = types.get(node.input[0]) == TensorProto.UINT8 and bits < 8  # int4 pairs packed in a uint8
        width = data[1] * (8 // bits) if packed else data[1]
        return [*_weight(f"{tag}/w", types[scales], [data[0], width]),
                helper.make_node("Gather", [f"{tag}/w", node.input[1]], [node.output[0]], name=tag, axis=0)]  # fmt: skip
    return None


def with_stand_ins(model: onnx.ModelProto) -> Callable[[onnx.ModelProto], onnx.ModelProto] | None:
    """Replace the quantized ops of ``model``'s main graph by their stand-ins, in place; returns the function that
    puts the original nodes back into the inferred model (and drops the stand-ins' shapes), or None when there was
    nothing to replace (``model`` unchanged)."""
    graph = model.graph
    types, dims = _elem_types(graph), _dims(graph)
    originals = list(graph.node)
    nodes: list[onnx.NodeProto] = []
    replaced = 0
    for i, node in enumerate(originals):
        stand_in = _stand_in(node, i, types, dims)
        replaced += stand_in is not None
        nodes.extend(stand_in or [node])
    if not replaced:
        return None
    del graph.node[:]
    graph.node.extend(nodes)

    def restore(inferred: onnx.ModelProto) -> onnx.ModelProto:
        del inferred.graph.node[:]
        inferred.graph.node.extend(originals)
        kept = [v for v in inferred.graph.value_info if not v.name.startswith(PREFIX)]
        del inferred.graph.value_info[:]
        inferred.graph.value_info.extend(kept)
        return inferred

    return restore


def infer_shapes_through_quantized_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX's shape inference (``data_prop``) of ``model`` (changed meanwhile), its quantized ops stood in for."""
    restore = with_stand_ins(model)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return restore(inferred) if restore is not None else inferred
