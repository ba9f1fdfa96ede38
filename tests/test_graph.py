"""The graph core: lazy external weights, streaming save, checks, edits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.errors import GraphCheckError, ModelLoadError
from qgraph.ir.graph import Graph

TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y) {
    two = Constant <value = float {2.0}> ()
    a = Mul (x, two)
    y = Relu (a)
}
"""


def _weighted_model(tmp_path: Path, n: int = 300) -> tuple[Path, np.ndarray]:
    """x[1,n] @ W[n,n] + b, saved with external data by onnx itself."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n,)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "w",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = tmp_path / "src" / "m.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.weights", size_threshold=0)
    return path, w


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_load_keeps_weights_lazy_and_save_streams(tmp_path: Path) -> None:
    path, w = _weighted_model(tmp_path)
    g = Graph.load(path)
    consts = [t for t in g.tensors().values() if t.name == "W"]
    assert type(consts[0]._values).__name__ == "_FileValues"  # nothing read yet
    assert g.weights_nbytes() == w.nbytes + 300 * 4
    np.testing.assert_array_equal(g.const_value(consts[0]), w)

    out = g.save(tmp_path / "out" / "model.onnx", external=True)
    assert (out.parent / "model.onnx.data").is_file()
    assert out.stat().st_size < 4096  # the graph file holds no weights
    x = np.random.default_rng(1).standard_normal((1, 300)).astype(np.float32)
    np.testing.assert_array_equal(_run(out, x), _run(path, x))
    # After the save the graph reads from the new file, even if the old one goes.
    (path.parent / "m.weights").unlink()
    np.testing.assert_array_equal(g.const_value(consts[0]), w)
    inline = g.save(tmp_path / "inline.onnx", external=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    np.testing.assert_array_equal(_run(inline, x), _run(out, x))


def test_save_over_its_own_source(tmp_path: Path) -> None:
    path, _ = _weighted_model(tmp_path)
    x = np.ones((1, 300), np.float32)
    ref = _run(path, x)
    g = Graph.load(path)
    g.save(path, external=True)
    g.save(path, external=True)  # reads and writes the same weights file
    np.testing.assert_array_equal(_run(path, x), ref)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path: Path, location: str) -> None:
    path, _ = _weighted_model(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="outside the model's folder|not a relative path"):
        Graph.load(path)


def test_missing_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no ONNX file"):
        Graph.load(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07this is not protobuf\xff\xff\xff")
    with pytest.raises(ModelLoadError):
        Graph.load(junk)
    path, _ = _weighted_model(tmp_path)
    (path.parent / "m.weights").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        Graph.load(path)


def test_parse_const_value_and_edit() -> None:
    g = Graph.parse(TEXT)
    mul = g.nodes_by_op("Mul")[0]
    assert g.scalar(mul.inputs[1]) == 2.0  # a Constant node, not an initializer
    assert g.const_value(mul.inputs[0]) is None
    # y = Relu(x * 2)  ->  y = Relu(x + x)
    add = g.add_node("Add", [mul.inputs[0], mul.inputs[0]], prefix="test")
    assert add.name == "test/0" and add.outputs[0].name.startswith("test/")
    g.replace_uses(mul.outputs[0], add.outputs[0])
    g.remove_nodes([mul])
    g.cleanup()
    assert g.op_counts() == {"Add": 1, "Relu": 1}
    g.check()


def test_a_node_added_next_to_a_node_already_gone_is_an_error() -> None:
    """remove_nodes, then anything that applies pending edits (here: reading the nodes), then add_node(before=) the
    removed node: the new node has nowhere to go; it used to vanish silently."""
    g = Graph.parse(TEXT)
    mul = g.nodes_by_op("Mul")[0]
    g.remove_nodes([mul])
    assert "Mul" not in g.op_counts()  # the removal is applied
    g.add_node("Add", [mul.inputs[0] if mul.inputs else g.inputs[0]] * 2, prefix="late", before=mul)
    with pytest.raises(RuntimeError, match=r"added before or after a node that is no longer in the graph"):
        _ = g.nodes  # applying the edits finds the lost insertion
    # Removed and added in one go (the removal not applied yet), the new node takes the old one's place.
    g2 = Graph.parse(TEXT)
    mul2 = g2.nodes_by_op("Mul")[0]
    x = mul2.inputs[0]
    g2.remove_nodes([mul2])
    g2.add_node("Add", [x, x], prefix="swap", before=mul2)
    assert [n.op for n in g2.nodes] == ["Constant", "Add", "Relu"]


def test_check_names_what_is_wrong() -> None:
    g = Graph.parse(TEXT)
    g.gs.nodes.reverse()  # Relu now reads 'a' before Mul makes it
    with pytest.raises(GraphCheckError, match="before it is produced"):
        g.check()
    g = Graph.parse(TEXT)
    g.gs.nodes[1].name = g.gs.nodes[2].name = "same"
    with pytest.raises(GraphCheckError, match="node name 'same'"):
        g.check()
    g = Graph.parse(TEXT)
    g.remove_nodes(g.nodes_by_op("Mul"))
    with pytest.raises(GraphCheckError, match="dangling"):
        g.check()
    g = Graph.parse(TEXT)
    g.nodes_by_op("Relu")[0].op = "Reluu"
    with pytest.raises(GraphCheckError, match="checker"):
        g.check()


def test_shape_inference_fills_shapes() -> None:
    g = Graph.parse(TEXT).infer_shapes()
    a = g.nodes_by_op("Mul")[0].outputs[0]
    assert list(a.shape) == [2, 3]


def test_shape_inference_goes_through_quantized_ops() -> None:
    """ONNX's inference stops at a contrib op; stand-ins for MatMulNBits and GatherBlockQuantized carry the shapes
    past them (a graph quantized by ``qgraph optimize --quantize`` is then pinned by compile), and leave the nodes."""
    from passes.quantize_weights import QuantizeWeights

    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Gather", ["E", "input_ids"], ["e"]), helper.make_node("MatMul", ["e", "W"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Shape", ["r"], ["s"])],
        "q", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("s", TensorProto.INT64, None)],
        [numpy_helper.from_array(rng.standard_normal((50, 64)).astype(np.float32), "E"),
         numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W")],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    for mode in ("int8", "int4"):
        graph = Graph.from_proto(model)
        QuantizeWeights(mode).run(graph)
        ops = [n.op for n in graph]
        assert ops == ["GatherBlockQuantized", "MatMulNBits", "Relu", "Shape"], ops
        graph.infer_shapes()
        assert [n.op for n in graph] == ops
        (relu,) = graph.nodes_by_op("Relu")
        assert list(relu.inputs[0].shape) == ["batch", "seq", 32] and relu.inputs[0].dtype == np.float32, mode
        assert list(graph.nodes_by_op("MatMulNBits")[0].inputs[0].shape) == ["batch", "seq", 64], mode
        assert list(graph.outputs[0].shape) == [3], mode
