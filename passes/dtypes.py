"""Element types as the fusions need them: a tensor's TensorProto dtype, declared or followed back a few ops."""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper

from passes.const_values import const_value
from qgraph.ir.graph import Graph, Tensor


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
SAME_DTYPE_INPUTS: dict[str, tuple[int, ...]] = {
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
    for i in SAME_DTYPE_INPUTS.get(prod.op, ()):
        if i < len(prod.inputs) and prod.inputs[i].name:
            found = tensor_dtype(graph, prod.inputs[i], depth - 1)
            if found is not None:
                return found
    return None
