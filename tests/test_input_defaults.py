"""Graph inputs with a default: an initializer of the same name is the value used when the input is not fed.

Such an initializer is ONNX's way of giving an input a default (IR version 4
and newer). It is not a constant: no pass may fold it, no fusion may read it as
one, and the input must stay, with its default, through load, every pass and
save.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from passes.const_values import const_value
from qgraph.errors import StaticShapeError
from qgraph.ir.graph import Graph

S_DEFAULT = np.linspace(-1, 1, 256, dtype=np.float32)  # 1 KiB: big enough to be saved as external data


def _model(ir_version: int = 10) -> onnx.ModelProto:
    """y = x + s*2, z = Reshape(x, shape), n = Shape(z); s and shape are inputs with defaults (initializers of the same names)."""
    nodes = [
        helper.make_node("Mul", ["s", "two"], ["t"]),
        helper.make_node("Add", ["x", "t"], ["y"]),
        helper.make_node("Reshape", ["x", "shape"], ["z"]),
        helper.make_node("Shape", ["z"], ["n"]),  # not [256, 2]: shape inference must not read the default either
    ]
    inits = [
        numpy_helper.from_array(S_DEFAULT, "s"),
        numpy_helper.from_array(np.float32(2.0), "two"),
        numpy_helper.from_array(np.array([256, 2], np.int64), "shape"),
    ]
    g = helper.make_graph(
        nodes,
        "defaults",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [256]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 256]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("n", TensorProto.INT64, None),
        ],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return model


def _run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)  # type: ignore[no-any-return]


def _cases() -> list[dict[str, np.ndarray]]:
    x = np.arange(512, dtype=np.float32).reshape(2, 256)
    return [{"x": x}, {"x": x, "s": np.full(256, 10.0, np.float32)}, {"x": x, "shape": np.array([8, 64], np.int64)}]


def _assert_same_as_the_original(model: onnx.ModelProto) -> None:
    for feeds in _cases():
        for want, got in zip(_run(_model(), feeds), _run(model, feeds)):
            np.testing.assert_array_equal(got, want)


def test_an_input_with_a_default_is_not_a_constant() -> None:
    g = Graph.from_proto(_model())
    t = g.tensors()
    assert [i.name for i in g.inputs] == ["x", "s", "shape"]
    for name in ("s", "shape"):
        assert not g.is_constant(t[name]) and g.const_value(t[name]) is None and const_value(g, t[name]) is None
    assert g.is_constant(t["two"])


def test_fold_constants_keeps_an_input_with_a_default(tmp_path: Path) -> None:
    g = Graph.from_proto(_model())
    qgraph.optimize(g, ["fold-constants", "cleanup"])
    assert g.op_counts()["Mul"] == 1 and g.op_counts()["Reshape"] == 1
    path = g.save(tmp_path / "out.onnx")
    saved = onnx.load(str(path))
    assert [i.name for i in saved.graph.input] == ["x", "s", "shape"]
    assert {"s", "shape"} <= {t.name for t in saved.graph.initializer}
    _assert_same_as_the_original(saved)


def test_pin_static_shapes_keeps_an_input_with_a_default() -> None:
    # z's shape is whatever the caller feeds as `shape`: it cannot be pinned (it is not the default's [256, 2]).
    with pytest.raises(StaticShapeError, match="z dim 0 is still symbolic"):
        qgraph.optimize(Graph.from_proto(_model()), ["pin-static-shapes"], batch_size=2, seq_len=4)
    model = _model()
    del model.graph.node[2:], model.graph.output[1:]  # y = x + s*2 alone
    g = Graph.from_proto(model)
    qgraph.optimize(g, ["pin-static-shapes", "cleanup"], batch_size=2, seq_len=4)
    assert [i.name for i in g.inputs] == ["x", "s", "shape"] and g.op_counts()["Mul"] == 1
    pinned = g.to_proto_inline()
    for feeds in _cases()[:2]:
        np.testing.assert_array_equal(_run(pinned, feeds)[0], _run(_model(), feeds)[0])


def test_a_fusion_does_not_read_a_default_as_a_constant() -> None:
    # 0.5 * x * (1 + erf(x / sqrt(2))) with 0.5 an input with a default: the caller may feed another value.
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["a"]),
        helper.make_node("Erf", ["a"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["p"]),
        helper.make_node("Mul", ["x", "p"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.float32(v), n) for n, v in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5))]
    vi = helper.make_tensor_value_info
    g = helper.make_graph(nodes, "gelu", [vi("x", TensorProto.FLOAT, [2, 4]), vi("half", TensorProto.FLOAT, [])],
                          [vi("y", TensorProto.FLOAT, [2, 4])], inits)  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    graph = Graph.from_proto(model)
    report = qgraph.optimize(graph, ["fuse-gelu"])
    assert "Gelu" not in graph.op_counts(), report
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    for feeds in ({"x": x}, {"x": x, "half": np.array(3.0, np.float32)}):
        np.testing.assert_allclose(_run(graph.to_proto_inline(), feeds)[0], _run(model, feeds)[0], rtol=1e-6)


def test_a_default_kept_in_external_data_survives_save_and_load(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(_model(), str(src / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    g = Graph.load(src / "m.onnx")
    qgraph.optimize(g, ["fold-constants", "cleanup"])
    out = g.save(tmp_path / "out" / "m.onnx", external=True)
    again = Graph.load(out)
    assert [i.name for i in again.inputs] == ["x", "s", "shape"]
    saved = onnx.load(str(out), load_external_data=False)  # the default's bytes now come from the new weights file
    assert any(t.name == "s" and t.data_location == TensorProto.EXTERNAL for t in saved.graph.initializer)
    _assert_same_as_the_original(onnx.load(str(out)))


def test_before_ir_4_an_initializer_listed_as_an_input_is_a_constant() -> None:
    # IR < 4 lists every initializer among the inputs; ONNX Runtime treats them as constants, and so does qgraph.
    g = Graph.from_proto(_model(ir_version=3))
    assert [i.name for i in g.inputs] == ["x"]
    assert g.is_constant(g.tensors()["s"])
