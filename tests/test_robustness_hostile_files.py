"""Robustness: malformed and hostile ONNX files.

Every malformed or hostile ONNX file is refused by ``qgraph inspect`` and
``qgraph optimize`` with exit code 2 and one line on stderr, before anything
is written and without opening a file outside the model's folder (a FIFO
outside the folder would block the process if it were opened). Legal models
that look odd still load, and validation stays cheap on a large graph.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import OPTIMUM, cli_command, run_all
from onnx import TensorProto, helper, numpy_helper

from qgraph.cli import main
from qgraph.errors import InvalidModelError, ModelLoadError, QGraphError
from qgraph.ir import files
from qgraph.ir.graph import Graph
from qgraph.ir.validate import validate_model


def _assert_clean_error(res: subprocess.CompletedProcess[str], command: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1, f"expected one line on stderr:\n{res.stderr}"
    assert lines[0].startswith(f"qgraph {command}: error: "), lines[0]
    return lines[0]


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           inits: list[TensorProto] = (), opsets: dict[str, int] | None = None) -> onnx.ModelProto:  # type: ignore[assignment]  # fmt: skip
    g = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in (opsets or {"": 17}).items()])
    model.ir_version = 10
    return model


def _vi(name: str, shape: list[int | str] | None = (2, 4), dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:  # type: ignore[assignment]
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


def _good() -> onnx.ModelProto:
    """y = Relu(x @ W): valid, with one 4x4 weight."""
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "W")
    return _model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], [_vi("x")], [_vi("y")], [w])


def _save(model: onnx.ModelProto, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _external(folder: Path, location: str | None = None, **keys: str) -> Path:
    """The good model with W in ``w.bin``; ``location`` and ``keys`` then overwrite its external_data entries."""
    folder.mkdir(parents=True, exist_ok=True)
    model = _good()
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    (t,) = model.graph.initializer
    entries = {e.key: e.value for e in t.external_data}
    entries.update({"location": location} if location is not None else {})
    entries.update(keys)
    del t.external_data[:]
    for k, v in entries.items():
        t.external_data.add(key=k, value=v)
    return _save(model, folder)


def _outside(folder: Path) -> Path:
    """A file beside the model's folder, holding enough bytes for W (it must never be read)."""
    secret = folder.parent / f"{folder.name}-outside.bin"
    secret.write_bytes(b"SECRET" * 20)
    return secret


def case_random_bytes(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return d / "model.onnx"


def case_random_bytes_that_parse(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"\x08\x07\x12\x03abc")  # a valid ModelProto: ir_version and a producer name
    return d / "model.onnx"


def case_truncated(d: Path) -> Path:
    data = _good().SerializeToString()
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(data[: len(data) // 2])
    return d / "model.onnx"


def case_empty(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"")
    return d / "model.onnx"


def case_no_graph(d: Path) -> Path:
    model = onnx.ModelProto(ir_version=10)
    model.opset_import.add(domain="", version=17)
    return _save(model, d)


def case_empty_graph(d: Path) -> Path:
    return _save(_model([], [], []), d)


def case_cycle(d: Path) -> Path:
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2"),
             helper.make_node("Relu", ["b"], ["y"], name="n3")]  # fmt: skip
    return _save(_model(nodes, [_vi("x")], [_vi("y")]), d)


def case_self_loop(d: Path) -> Path:
    return _save(_model([helper.make_node("Add", ["x", "y"], ["y"], name="loop")], [_vi("x")], [_vi("y")]), d)


def case_dangling_input(d: Path) -> Path:
    return _save(_model([helper.make_node("Add", ["x", "nobody_makes_this"], ["y"])], [_vi("x")], [_vi("y")]), d)


def case_output_not_produced(d: Path) -> Path:
    return _save(_model([helper.make_node("Relu", ["x"], ["h"])], [_vi("x")], [_vi("y")]), d)


def case_two_producers(d: Path) -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="a"), helper.make_node("Neg", ["x"], ["y"], name="b")]
    return _save(_model(nodes, [_vi("x")], [_vi("y")]), d)


def case_external_dotdot(d: Path) -> Path:
    _outside(d)
    return _external(d, f"../{d.name}-outside.bin")


def case_external_absolute(d: Path) -> Path:
    return _external(d, "/etc/passwd")


def case_external_absolute_outside(d: Path) -> Path:
    return _external(d, str(_outside(d)))


def case_external_symlink_out(d: Path) -> Path:
    path = _external(d)
    (d / "w.bin").unlink()
    (d / "w.bin").symlink_to(_outside(d))
    return path


def case_external_fifo_outside(d: Path) -> Path:
    # If anything opened the FIFO for reading, the process would block until the timeout.
    fifo = d.parent / f"{d.name}-fifo"
    os.mkfifo(fifo)
    path = _external(d, "w2.bin")
    (d / "w2.bin").symlink_to(fifo)
    return path


def case_external_fifo_dotdot(d: Path) -> Path:
    os.mkfifo(d.parent / f"{d.name}-fifo")
    return _external(d, f"../{d.name}-fifo")


def case_external_missing(d: Path) -> Path:
    path = _external(d)
    (d / "w.bin").unlink()
    return path


def case_external_truncated(d: Path) -> Path:
    path = _external(d)
    (d / "w.bin").write_bytes(b"\0" * 10)
    return path


def case_external_wrong_length(d: Path) -> Path:
    return _external(d, length="8")


def case_external_bad_offset(d: Path) -> Path:
    return _external(d, offset="lots")


def case_absurd_initializer(d: Path) -> Path:
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1 << 31, 1 << 31, 1 << 31], raw_data=b"")
    return _save(_model([helper.make_node("Add", ["x", "W"], ["y"])], [_vi("x")], [_vi("y")], [t]), d)


def case_negative_dim(d: Path) -> Path:
    return _save(_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2, -5])], [_vi("y")]), d)


def case_huge_input(d: Path) -> Path:
    return _save(_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [1 << 30, 1 << 30, "batch"])], [_vi("y", None)]), d)


def case_rank_100(d: Path) -> Path:
    return _save(_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [1] * 100)], [_vi("y", None)]), d)


def case_raw_data_short(d: Path) -> Path:
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 4], raw_data=b"\0" * 12)
    return _save(_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x")], [_vi("y")], [t]), d)


def case_dtype_mismatch_data(d: Path) -> Path:
    # int64 values (8 bytes each) declared as float32 [4, 4]
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 4], raw_data=np.arange(16, dtype=np.int64).tobytes())
    return _save(_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x")], [_vi("y")], [t]), d)


def case_undefined_dtype(d: Path) -> Path:
    t = TensorProto(name="W", data_type=TensorProto.UNDEFINED, dims=[4], raw_data=b"\0" * 16)
    return _save(_model([helper.make_node("Add", ["x", "W"], ["y"])], [_vi("x")], [_vi("y")], [t]), d)


def case_typed_data_short(d: Path) -> Path:
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 4], float_data=[1.0, 2.0])
    return _save(_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x")], [_vi("y")], [t]), d)


def case_input_dtypes_mismatch(d: Path) -> Path:
    return _save(_model([helper.make_node("Add", ["x", "z"], ["y"])], [_vi("x"), _vi("z", dtype=TensorProto.INT64)], [_vi("y")]), d)


def case_declared_dtype_contradicts(d: Path) -> Path:
    nodes = [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT64)]
    return _save(_model(nodes, [_vi("x")], [_vi("y", dtype=TensorProto.FLOAT)]), d)


def case_unknown_op(d: Path) -> Path:
    return _save(_model([helper.make_node("Reluu", ["x"], ["y"])], [_vi("x")], [_vi("y")]), d)


def case_op_newer_than_opset(d: Path) -> Path:
    return _save(_model([helper.make_node("Gelu", ["x"], ["y"])], [_vi("x")], [_vi("y")]), d)


def case_custom_domain_without_opset(d: Path) -> Path:
    return _save(_model([helper.make_node("MyOp", ["x"], ["y"], domain="com.example")], [_vi("x")], [_vi("y")]), d)


def case_constant_with_external_data(d: Path) -> Path:
    _outside(d)
    value = TensorProto(name="v", data_type=TensorProto.FLOAT, dims=[2, 4], data_location=TensorProto.EXTERNAL)
    value.external_data.add(key="location", value=f"../{d.name}-outside.bin")
    nodes = [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Add", ["x", "c"], ["y"])]
    return _save(_model(nodes, [_vi("x")], [_vi("y")]), d)


def case_ir_version_from_the_future(d: Path) -> Path:
    model = _good()
    model.ir_version = 99
    return _save(model, d)


def case_opset_from_the_future(d: Path) -> Path:
    model = _good()
    model.opset_import[0].version = 9999
    return _save(model, d)


def case_duplicate_initializer(d: Path) -> Path:
    model = _good()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((4, 4), np.float32), "W"))
    return _save(model, d)


# ---------------------------------------------------------------- subgraphs and functions
def _if_model(then_nodes: list[onnx.NodeProto], then_out: str = "b") -> onnx.ModelProto:
    """y = If(c, then: ``then_nodes`` making ``then_out``, else: Identity(x)); the branches read x from the outer graph."""
    then = helper.make_graph(then_nodes, "then", [], [_vi(then_out)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_vi("e")])
    node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)
    return _model([node], [_vi("x"), _vi("c", [], TensorProto.BOOL)], [_vi("y")])


def _loop_model(body_nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """y = Loop(m, x) whose body turns v_in into v_out with ``body_nodes``."""
    keep_going = helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")
    body = helper.make_graph([keep_going, *body_nodes], "body", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("v_in")],
                             [_vi("cond_out", [], TensorProto.BOOL), _vi("v_out")])  # fmt: skip
    node = helper.make_node("Loop", ["m", "", "x"], ["y"], name="loop", body=body)
    return _model([node], [_vi("x"), _vi("m", [], TensorProto.INT64)], [_vi("y")])


def _scan_model(body_nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """y = Scan over the rows of x, each row turned into an output row by ``body_nodes`` (row -> out)."""
    body = helper.make_graph(body_nodes, "body", [_vi("row", [4])], [_vi("out", [4])])
    node = helper.make_node("Scan", ["x"], ["y"], name="scan", body=body, num_scan_inputs=1)
    return _model([node], [_vi("x")], [_vi("y")])


def _function_model(body_nodes: list[onnx.NodeProto], outputs: tuple[str, ...] = ("b",)) -> onnx.ModelProto:
    """y = local.F(x), a model-local function whose body turns a into ``outputs`` with ``body_nodes``."""
    f = helper.make_function("local", "F", ["a"], list(outputs), body_nodes, [helper.make_opsetid("", 17)])
    model = _model([helper.make_node("F", ["x"], ["y"], name="call", domain="local")], [_vi("x")], [_vi("y")], opsets={"": 17, "local": 1})
    model.functions.append(f)
    return model


def case_if_body_empty_op_type(d: Path) -> Path:
    return _save(_if_model([helper.make_node("", ["x"], ["b"], name="bad")]), d)


def case_if_body_unknown_op(d: Path) -> Path:
    return _save(_if_model([helper.make_node("Reluu", ["x"], ["b"], name="bad")]), d)


def case_if_body_two_producers(d: Path) -> Path:
    return _save(_if_model([helper.make_node("Relu", ["x"], ["b"], name="p1"), helper.make_node("Neg", ["x"], ["b"], name="p2")]), d)


def case_if_body_writes_an_outer_name(d: Path) -> Path:
    return _save(_if_model([helper.make_node("Relu", ["x"], ["c"], name="again"), helper.make_node("Neg", ["c"], ["b"], name="n")]), d)


def case_if_body_output_not_produced(d: Path) -> Path:
    return _save(_if_model([helper.make_node("Relu", ["x"], ["h"], name="r")], then_out="b"), d)


def case_loop_body_dangling_input(d: Path) -> Path:
    return _save(_loop_model([helper.make_node("Add", ["v_in", "nobody_makes_this"], ["v_out"], name="bad")]), d)


def case_loop_body_cycle(d: Path) -> Path:
    nodes = [helper.make_node("Add", ["v_in", "q"], ["p"], name="n1"), helper.make_node("Relu", ["p"], ["q"], name="n2"),
             helper.make_node("Relu", ["q"], ["v_out"], name="n3")]  # fmt: skip
    return _save(_loop_model(nodes), d)


def case_scan_body_op_newer_than_opset(d: Path) -> Path:
    return _save(_scan_model([helper.make_node("Gelu", ["row"], ["out"], name="bad")]), d)


def case_function_body_empty_op_type(d: Path) -> Path:
    return _save(_function_model([helper.make_node("", ["a"], ["b"], name="bad")]), d)


def case_function_body_unknown_op(d: Path) -> Path:
    return _save(_function_model([helper.make_node("Reluu", ["a"], ["b"], name="bad")]), d)


def case_function_body_dangling_input(d: Path) -> Path:
    return _save(_function_model([helper.make_node("Add", ["a", "nobody_makes_this"], ["b"], name="bad")]), d)


def case_function_body_two_producers(d: Path) -> Path:
    return _save(_function_model([helper.make_node("Relu", ["a"], ["b"], name="p1"), helper.make_node("Neg", ["a"], ["b"], name="p2")]), d)


def case_function_output_not_produced(d: Path) -> Path:
    return _save(_function_model([helper.make_node("Relu", ["a"], ["h"], name="r")]), d)


def case_function_body_if_unknown_op(d: Path) -> Path:
    then = helper.make_graph([helper.make_node("Reluu", ["a"], ["t"], name="bad")], "then", [], [_vi("t")])
    other = helper.make_graph([helper.make_node("Identity", ["a"], ["e"], name="id")], "else", [], [_vi("e")])
    nodes = [helper.make_node("Constant", [], ["k"], name="k", value=helper.make_tensor("k", TensorProto.BOOL, [], [True])),
             helper.make_node("If", ["k"], ["b"], name="inner_if", then_branch=then, else_branch=other)]  # fmt: skip
    return _save(_function_model(nodes), d)


def case_function_constant_with_external_data(d: Path) -> Path:
    _outside(d)
    value = TensorProto(name="v", data_type=TensorProto.FLOAT, dims=[2, 4], data_location=TensorProto.EXTERNAL)
    value.external_data.add(key="location", value=f"../{d.name}-outside.bin")
    nodes = [helper.make_node("Constant", [], ["v"], name="const", value=value), helper.make_node("Add", ["a", "v"], ["b"], name="add")]
    return _save(_function_model(nodes), d)


#: Each hostile file, and what the error must say.
CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "random_bytes": (case_random_bytes, "not a readable ONNX model"),
    "random_bytes_that_parse": (case_random_bytes_that_parse, "has no graph"),
    "truncated": (case_truncated, "not a readable ONNX model"),
    "empty": (case_empty, "is empty"),
    "no_graph": (case_no_graph, "has no graph"),
    "empty_graph": (case_empty_graph, "graph is empty"),
    "cycle": (case_cycle, r"has a cycle \('n1' \(Add\) -> 'n2' \(Relu\) -> 'n1'|has a cycle \('n2' \(Relu\) -> 'n1' \(Add\) -> 'n2'"),
    "self_loop": (case_self_loop, r"cycle \('loop' \(Add\) -> 'loop'"),
    "dangling_input": (case_dangling_input, "reads 'nobody_makes_this', which is not a graph input"),
    "output_not_produced": (case_output_not_produced, "graph output 'y' is not produced"),
    "two_producers": (case_two_producers, "tensor 'y' is produced by node 'a' .* and by node 'b'"),
    "external_dotdot": (case_external_dotdot, r"outside the model's folder \('\.\.'\)"),
    "external_absolute": (case_external_absolute, "/etc/passwd.* is not a relative path"),
    "external_absolute_outside": (case_external_absolute_outside, "is not a relative path"),
    "external_symlink_out": (case_external_symlink_out, "resolves outside the model's folder"),
    "external_fifo_outside": (case_external_fifo_outside, "resolves outside the model's folder"),
    "external_fifo_dotdot": (case_external_fifo_dotdot, r"outside the model's folder \('\.\.'\)"),
    "external_missing": (case_external_missing, "is missing"),
    "external_truncated": (case_external_truncated, "lies past the end of w.bin"),
    "external_wrong_length": (case_external_wrong_length, "is 8 bytes but a float tensor of shape \\[4, 4\\] needs 64"),
    "external_bad_offset": (case_external_bad_offset, "non-numeric offset"),
    "absurd_initializer": (case_absurd_initializer, "dimensions are absurd"),
    "negative_dim": (case_negative_dim, "negative dimension -5"),
    "huge_input": (case_huge_input, r"graph input 'x' has the shape \[1073741824, 1073741824, '\?'\]"),
    "rank_100": (case_rank_100, "rank 100, more than 64"),
    "raw_data_short": (case_raw_data_short, "holds 12 bytes of data but a float tensor of shape \\[4, 4\\] needs 64"),
    "dtype_mismatch_data": (case_dtype_mismatch_data, "holds 128 bytes of data but a float tensor"),
    "undefined_dtype": (case_undefined_dtype, "no data type"),
    "typed_data_short": (case_typed_data_short, "holds 2 values but a float tensor of shape \\[4, 4\\] needs 16"),
    "input_dtypes_mismatch": (case_input_dtypes_mismatch, "types do not agree.*inconsistent type"),
    "declared_dtype_contradicts": (case_declared_dtype_contradicts, "types do not agree.*Inferred elem type differs"),
    "unknown_op": (case_unknown_op, "is not an ONNX op"),
    "op_newer_than_opset": (case_op_newer_than_opset, "needs opset 20 or newer"),
    "custom_domain_without_opset": (case_custom_domain_without_opset, "imports no opset for it"),
    "constant_with_external_data": (case_constant_with_external_data, "keeps its data in an external file"),
    "ir_version_from_the_future": (case_ir_version_from_the_future, "IR version 99, newer than this onnx"),
    "opset_from_the_future": (case_opset_from_the_future, "imports opset 9999, newer than this onnx"),
    "duplicate_initializer": (case_duplicate_initializer, "initializer 'W' is given twice"),
    "if_body_empty_op_type": (case_if_body_empty_op_type, r"node 'bad' \(\) in attribute 'then_branch' of node 'if' has no op type"),
    "if_body_unknown_op": (case_if_body_unknown_op, r"node 'bad' \(Reluu\) in attribute 'then_branch' of node 'if' is not an ONNX op"),
    "if_body_two_producers": (
        case_if_body_two_producers,
        r"tensor 'b' is produced by node 'p1' \(Relu\) and by node 'p2' \(Neg\) in attribute 'then_branch'",
    ),
    "if_body_writes_an_outer_name": (
        case_if_body_writes_an_outer_name,
        r"node 'again' \(Relu\) in attribute 'then_branch' of node 'if' writes 'c', which an enclosing graph",
    ),
    "if_body_output_not_produced": (
        case_if_body_output_not_produced,
        r"output 'b' of attribute 'then_branch' of node 'if' is not produced",
    ),
    "loop_body_dangling_input": (
        case_loop_body_dangling_input,
        r"node 'bad' \(Add\) in attribute 'body' of node 'loop' reads 'nobody_makes_this'",
    ),
    "loop_body_cycle": (case_loop_body_cycle, r"attribute 'body' of node 'loop' has a cycle"),
    "scan_body_op_newer_than_opset": (
        case_scan_body_op_newer_than_opset,
        r"node 'bad' \(Gelu\) in attribute 'body' of node 'scan' needs opset 20",
    ),
    "function_body_empty_op_type": (case_function_body_empty_op_type, r"node 'bad' \(\) in function 'local.F' has no op type"),
    "function_body_unknown_op": (case_function_body_unknown_op, r"node 'bad' \(Reluu\) in function 'local.F' is not an ONNX op"),
    "function_body_dangling_input": (
        case_function_body_dangling_input,
        r"node 'bad' \(Add\) in function 'local.F' reads 'nobody_makes_this'",
    ),
    "function_body_two_producers": (
        case_function_body_two_producers,
        r"tensor 'b' is produced by node 'p1' \(Relu\) and by node 'p2' \(Neg\) in function 'local.F'",
    ),
    "function_output_not_produced": (case_function_output_not_produced, r"output 'b' of function 'local.F' is not produced"),
    "function_body_if_unknown_op": (
        case_function_body_if_unknown_op,
        r"node 'bad' \(Reluu\) in attribute 'then_branch' of node 'inner_if' in function 'local.F' is not an ONNX op",
    ),
    "function_constant_with_external_data": (
        case_function_constant_with_external_data,
        r"attribute 'value' of node 'const' in function 'local.F' keeps its data in an external file",
    ),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each case's model file and the output path ``qgraph optimize`` is told to write (in an empty folder)."""
    root = tmp_path_factory.mktemp("hostile")
    files = {}
    for name, (build, _) in CASES.items():
        out_dir = root / f"{name}-out"
        out_dir.mkdir()
        files[name] = (build(root / name), out_dir / "out.onnx")
    return files


@pytest.fixture(scope="module")
def cli_results(hostile: dict[str, tuple[Path, Path]]) -> dict[str, tuple[subprocess.CompletedProcess[str], ...]]:
    names = list(hostile)
    commands = []
    for name in names:
        path, out = hostile[name]
        commands += [cli_command("inspect", str(path)), cli_command("optimize", str(path), "-o", str(out))]
    results = run_all(commands, timeout=90, jobs=4)
    return {name: (results[2 * i], results[2 * i + 1]) for i, name in enumerate(names)}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_file_is_refused_in_process(case: str, hostile: dict[str, tuple[Path, Path]]) -> None:
    path, _ = hostile[case]
    with pytest.raises(ModelLoadError, match=CASES[case][1]):
        Graph.load(path)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_file_is_refused_by_the_cli(case: str, hostile: dict[str, tuple[Path, Path]], cli_results) -> None:
    _, out = hostile[case]
    inspect, optimize = cli_results[case]
    line = _assert_clean_error(inspect, "inspect")
    assert re.search(CASES[case][1], line), line
    _assert_clean_error(optimize, "optimize")
    assert not out.exists() and not list(out.parent.iterdir()), f"optimize left {list(out.parent.iterdir())}"
    assert "SECRET" not in inspect.stderr + optimize.stderr


def test_legal_models_still_load(tmp_path: Path) -> None:
    # An acyclic graph out of order, an omitted optional input, external data in a subfolder.
    nodes = [helper.make_node("Relu", ["h"], ["y"]), helper.make_node("Clip", ["x", "", "hi"], ["h"])]
    model = _model(nodes, [_vi("x")], [_vi("y")], [numpy_helper.from_array(np.float32(1.0), "hi")])
    Graph.from_proto(model)
    folder = tmp_path / "m"
    path = _external(folder, "sub/w.bin")
    (folder / "sub").mkdir()
    (folder / "w.bin").rename(folder / "sub" / "w.bin")
    g = Graph.load(path)
    np.testing.assert_array_equal(g.const_value(g.tensors()["W"]), np.arange(16, dtype=np.float32).reshape(4, 4))
    Graph.load(OPTIMUM)


def test_legal_subgraphs_and_functions_still_load() -> None:
    # Branches that read outer names (one returns an outer name as is), and a function whose Constant
    # takes its value from the caller's attribute (a reference, no value of its own).
    Graph.from_proto(_if_model([helper.make_node("Relu", ["x"], ["b"], name="r")]))
    Graph.from_proto(_if_model([], then_out="x"))
    Graph.from_proto(_loop_model([helper.make_node("Add", ["v_in", "x"], ["v_out"], name="add")]))
    model = _function_model([helper.make_node("Constant", [], ["k"], name="k", value=helper.make_tensor("k", TensorProto.FLOAT, [], [1.0])),
                             helper.make_node("Add", ["a", "k"], ["b"], name="add")])  # fmt: skip
    Graph.from_proto(model)
    ref = helper.make_node("Constant", [], ["k"], name="k")
    ref.attribute.append(onnx.AttributeProto(name="value", ref_attr_name="scale", type=onnx.AttributeProto.TENSOR))
    model = _function_model([ref, helper.make_node("Add", ["a", "k"], ["b"], name="add")])
    model.functions[0].attribute.append("scale")
    model.graph.node[0].attribute.append(helper.make_attribute("scale", helper.make_tensor("s", TensorProto.FLOAT, [], [2.0])))
    onnx.checker.check_model(model, full_check=True)
    Graph.from_proto(model)


def _sparse_model(folder: Path, nbytes: int) -> Path:
    """y = x @ W with W [nbytes/16, 4] float32 in a sparse file: it declares ``nbytes`` and holds almost nothing on disk."""
    rows = nbytes // 16
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[rows, 4], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "w.bin"), ("offset", "0"), ("length", str(nbytes))):
        w.external_data.add(key=k, value=v)
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x", [1, rows])], [_vi("y", [1, 4])], [w])
    path = _save(model, folder)
    with open(folder / "w.bin", "wb") as f:
        f.truncate(nbytes)  # a hole: no block is written
    return path


def test_an_output_that_cannot_fit_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    # 16 MiB declared by a sparse file, 1 MiB free on the output's filesystem (the probe is patched: nothing
    # is filled): save and `qgraph optimize` refuse in one line and leave nothing behind, inline or external.
    path = _sparse_model(tmp_path / "m", 16 << 20)
    assert path.stat().st_size < 200
    probed: list[Path] = []
    monkeypatch.setattr(files, "free_bytes", lambda p: probed.append(p) or 1 << 20, raising=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    g = Graph.load(path)
    for external in (True, False):
        with pytest.raises(QGraphError, match=r"needs 16\.0 MiB .* has 1\.0 MiB free"):
            g.save(out_dir / "out.onnx", external=external)
        assert not list(out_dir.iterdir())
    assert main(["optimize", str(path), "-o", str(out_dir / "out.onnx"), "--passes", "fold-constants,cleanup"]) == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]  # after the progress lines
    assert "Traceback" not in err and line.startswith("qgraph optimize: error: ") and "sparse" in line, err
    assert not list(out_dir.iterdir()) and probed
    # With room enough the same model is written (its hole copied as zeros).
    monkeypatch.setattr(files, "free_bytes", lambda p: 1 << 40)
    g.save(out_dir / "out.onnx", external=True)
    assert (out_dir / "out.onnx.data").stat().st_size >= 16 << 20


def test_validation_is_cheap_on_a_large_graph() -> None:
    # 3000 nodes in reverse order (acyclic, unsorted): validation takes well under a second (about 0.1 s;
    # CPU time, so a busy machine does not fail the test).
    n = 3000
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"r{i}") for i in reversed(range(n))]
    model = _model(nodes, [_vi("t0")], [_vi(f"t{n}")])
    start = time.process_time()
    validate_model(model)
    assert time.process_time() - start < 2.0
    model.graph.node[-1].input[0] = f"t{n}"  # r0 now reads the last output: one long cycle
    with pytest.raises(InvalidModelError, match="cycle"):
        validate_model(model)
