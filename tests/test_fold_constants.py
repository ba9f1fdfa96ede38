"""fold-constants: golden cases, every numpy kernel against onnx's reference, declines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from helpers import check_case, run_pass
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from passes.fold_constants import FoldConstants
from passes.fold_kernels import KERNELS
from passes.folding import fold_constants
from qgraph.ir.graph import Graph


def test_shape_math_folds(golden: Any) -> None:
    # Shape with start, ReduceProd, Gather of a partly static shape, Range,
    # Cast, Slice, Transpose/Neg/Reshape on constants; two graph outputs fold.
    out = check_case(FoldConstants, "shape_math", golden, expect_modified=True, expect_stats={"folded": 10, "constant_nodes": 6})
    assert [t.name for t in out.outputs] == ["y", "r", "z"]  # folded outputs keep their names
    assert out.op_counts() == {"Shape": 1, "Gather": 1, "Concat": 1, "Reshape": 1, "Constant": 2}


def test_dynamic_shapes_are_left_alone(golden: Any) -> None:
    check_case(FoldConstants, "dynamic", golden, expect_modified=False)


# --------------------------------------------------------------------------- kernels

I64, F32 = np.int64, np.float32
_BIG = np.iinfo(np.int64).max
# (op, inputs, attrs); every input is an initializer, opset 18.
KERNEL_CASES: list[tuple[str, list[Any], dict[str, Any]]] = [
    ("Identity", [np.arange(6, dtype=I64).reshape(2, 3)], {}),
    ("Gather", [np.arange(12, dtype=F32).reshape(3, 4), np.array([[0, -1]], I64)], {"axis": 1}),
    ("Gather", [np.array([5, 6, 7], I64), np.array(-1, I64)], {}),
    ("Unsqueeze", [np.arange(6, dtype=I64).reshape(2, 3), np.array([-1, 0], I64)], {}),
    ("Squeeze", [np.zeros((1, 3, 1), F32), np.array([0], I64)], {}),
    ("Squeeze", [np.zeros((1, 3, 1), F32)], {}),
    ("Concat", [np.array([1, 2], I64), np.array([3], I64), np.array([], I64)], {"axis": -1}),
    (
        "Slice",
        [
            np.arange(30, dtype=F32).reshape(5, 6),
            np.array([1, -1], I64),
            np.array([_BIG, -7], I64),
            np.array([0, 1], I64),
            np.array([1, -2], I64),
        ],
        {},
    ),
    ("Slice", [np.arange(4, dtype=I64), np.array([-3], I64), np.array([-1], I64)], {}),
    ("Cast", [np.array([-1.7, 2.5, 0.0], F32)], {"to": TensorProto.INT64}),
    ("Cast", [np.array([0, 3], I64)], {"to": TensorProto.BOOL}),
    ("Cast", [np.array([1.5, 70000.0], F32)], {"to": TensorProto.FLOAT16}),
    ("Range", [np.array(2, I64), np.array(11, I64), np.array(3, I64)], {}),
    ("Range", [np.array(10, I64), np.array(2, I64), np.array(-3, I64)], {}),
    ("Range", [np.array(0.5, F32), np.array(2.0, F32), np.array(0.4, F32)], {}),
    ("Add", [np.array([[1], [2]], I64), np.array([10, 20, 30], I64)], {}),
    ("Sub", [np.array([1.5, 2.0], F32), np.array(0.25, F32)], {}),
    ("Mul", [np.array([3, -4], I64), np.array([5, 6], I64)], {}),
    ("Div", [np.array([7, -7, 7, -7, 6], I64), np.array([2, 2, -2, -2, 3], I64)], {}),
    ("Div", [np.array([1.0, -3.0], F32), np.array([4.0, 2.0], F32)], {}),
    ("Pow", [np.array([2.0, 3.0], F32), np.array([3, 2], I64)], {}),
    ("Pow", [np.array([4.0, 9.0], F32), np.array(0.5, F32)], {}),
    ("Equal", [np.array([1, 2, 3], I64), np.array([1, 0, 3], I64)], {}),
    ("Less", [np.array([1, 2, 3], I64), np.array(2, I64)], {}),
    ("Greater", [np.array([1, 2, 3], I64), np.array(2, I64)], {}),
    ("LessOrEqual", [np.array([1, 2, 3], I64), np.array(2, I64)], {}),
    ("GreaterOrEqual", [np.array([1.0, 2.0], F32), np.array(2.0, F32)], {}),
    ("And", [np.array([True, True, False]), np.array([True, False, False])], {}),
    ("Or", [np.array([True, True, False]), np.array([True, False, False])], {}),
    ("Not", [np.array([True, False])], {}),
    ("Where", [np.array([[True], [False]]), np.array([1, 2, 3], I64), np.array(-1, I64)], {}),
    ("Reshape", [np.arange(24, dtype=F32).reshape(2, 3, 4), np.array([0, -1, 2], I64)], {}),
    ("Reshape", [np.arange(6, dtype=I64), np.array([3, 2], I64)], {"allowzero": 1}),
    ("ConstantOfShape", [np.array([2, 3], I64)], {"value": numpy_helper.from_array(np.array([7], I64))}),
    ("ConstantOfShape", [np.array([2], I64)], {}),
    ("Expand", [np.array([[1.0], [2.0], [3.0]], F32), np.array([2, 1, 4], I64)], {}),
    ("Min", [np.array([1.0, 5.0], F32), np.array([[3.0], [0.0]], F32), np.array(2.0, F32)], {}),
    ("Max", [np.array([1, 5], I64), np.array([3, 0], I64)], {}),
    ("Neg", [np.array([1, -2], I64)], {}),
    ("Abs", [np.array([1.5, -2.0], F32)], {}),
    ("Sqrt", [np.array([4.0, 2.0], F32)], {}),
    ("Floor", [np.array([-1.5, 2.5], F32)], {}),
    ("Ceil", [np.array([-1.5, 2.5], F32)], {}),
    ("ReduceProd", [np.array([[1, 2, 3], [4, 5, 6]], I64), np.array([1], I64)], {"keepdims": 0}),
    ("ReduceProd", [np.array([[1, 2, 3], [4, 5, 6]], I64)], {}),
    ("Transpose", [np.arange(24, dtype=F32).reshape(2, 3, 4)], {"perm": [2, 0, 1]}),
    ("Transpose", [np.arange(6, dtype=I64).reshape(2, 3)], {}),
    ("Trilu", [np.ones((2, 3, 4), F32), np.array(1, I64)], {}),
    ("Trilu", [np.ones((3, 4), I64), np.array(-1, I64)], {"upper": 0}),
]


def _one_node_model(op: str, inputs: list[np.ndarray], attrs: dict[str, Any]) -> onnx.ModelProto:
    names = [f"in{i}" for i in range(len(inputs))]
    node = helper.make_node(op, names, ["out"], **attrs)
    graph = helper.make_graph(
        [node], "k", [], [helper.make_tensor_value_info("out", TensorProto.UNDEFINED, None)],
        [numpy_helper.from_array(x, n) for n, x in zip(names, inputs)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # Cast of 70000 to float16
@pytest.mark.parametrize(("op", "inputs", "attrs"), KERNEL_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(KERNEL_CASES)])
def test_kernel_matches_the_reference(op: str, inputs: list[np.ndarray], attrs: dict[str, Any]) -> None:
    model = _one_node_model(op, inputs, attrs)
    (want,) = ReferenceEvaluator(model).run(None, {})
    graph = Graph.from_proto(model)
    stats = fold_constants(graph)
    assert stats.get("folded") == 1, stats
    (node,) = graph.nodes  # a Constant node now makes the graph output
    got = np.asarray(node.attrs["value"].values)
    assert got.dtype == want.dtype and got.shape == want.shape, (got, want)
    np.testing.assert_array_equal(got, want)


def test_every_kernel_is_tested() -> None:
    assert {c[0] for c in KERNEL_CASES} == set(KERNELS)


def test_other_ops_fall_back_to_the_reference_evaluator() -> None:
    model = _one_node_model("Mod", [np.array([5, -5, 7], I64), np.array([3, 3, -2], I64)], {})
    graph = Graph.from_proto(model)
    assert fold_constants(graph) == {"folded": 1}
    np.testing.assert_array_equal(graph.nodes[0].attrs["value"].values, [2, 1, -1])


# --------------------------------------------------------------------------- declines


def _fold(text: str) -> tuple[Graph, Any]:
    graph = Graph.parse(text)
    return graph, run_pass(FoldConstants(), graph)


def test_random_subgraph_and_foreign_domain_ops_are_not_folded() -> None:
    graph, result = _fold(
        """
        <ir_version: 10, opset_import: ["" : 18, "com.microsoft" : 1]>
        g (float[2] x) => (float[2, 2] r, float[2] i, float[2] f)
        <float[2] c = {1.0, 2.0}, bool cond = {1}>
        {
            r = RandomUniform <shape = [2, 2], seed = 1.0> ()
            i = If (cond) <then_branch = t () => (float[2] a) { a = Identity (c) },
                           else_branch = e () => (float[2] b) { b = Neg (c) }>
            f = com.microsoft.Gelu (c)
        }
        """
    )
    assert result.modified is False
    assert sorted(graph.op_counts()) == ["Gelu", "If", "RandomUniform"]


def test_a_node_reading_a_graph_input_is_not_folded() -> None:
    graph, result = _fold(
        """
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y)
        <float[2] c = {1.0, 2.0}>
        {
            y = Add (c, x)
        }
        """
    )
    assert result.modified is False and graph.op_counts() == {"Add": 1}


def _big_weight_model(tmp_path: Path) -> Path:
    """W [600, 600] float32 (1.4 MB, external): y = x @ Transpose(W), s = Shape(W)."""
    w = np.random.default_rng(0).standard_normal((600, 600)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["W"], ["wt"]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
        helper.make_node("Shape", ["W"], ["s"]),
    ]
    g = helper.make_graph(
        nodes, "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 600])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 600]),
         helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
        [numpy_helper.from_array(w, "W")],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="big.data", size_threshold=0)
    return path


def test_large_constants_stay_lazy_but_their_shape_folds(tmp_path: Path) -> None:
    graph = Graph.load(_big_weight_model(tmp_path))
    result = run_pass(FoldConstants(), graph)
    assert result.stats == {"folded": 1, "too_large": 1}  # Shape folded, Transpose declined
    assert graph.op_counts() == {"Transpose": 1, "MatMul": 1, "Constant": 1}
    np.testing.assert_array_equal(graph.nodes_by_op("Constant")[0].attrs["value"].values, [600, 600])
    (w,) = [t for t in graph.tensors().values() if t.name == "W"]
    assert type(w._values).__name__ == "_FileValues"  # never read


def test_max_bytes_bounds_results() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    g () => (float[4, 4] y)
    <int64[2] shape = {4, 4}>
    {
        y = ConstantOfShape <value = float[1] {1.0}> (shape)
    }
    """
    small = run_pass(FoldConstants(max_bytes=32), Graph.parse(text))
    assert small.modified is False and small.stats == {"too_large": 1}
    assert run_pass(FoldConstants(), Graph.parse(text)).stats == {"folded": 1}


def test_a_constant_graph_output_that_is_also_read_stays_a_node() -> None:
    graph, result = _fold(
        """
        <ir_version: 10, opset_import: ["" : 18]>
        g () => (int64[2] k, int64[2] y)
        {
            k = Constant <value = int64[2] {3, 4}> ()
            y = Neg (k)
        }
        """
    )
    assert result.stats == {"folded": 1, "constant_nodes": 1}
    assert [t.name for t in graph.outputs] == ["k", "y"] and graph.op_counts() == {"Constant": 2}
    assert FoldConstants().run(graph).modified is False
