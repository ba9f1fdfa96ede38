"""Robustness and safety: malformed and hostile inputs, bad arguments, atomic outputs, no code on load.

Every malformed or hostile ONNX file is refused by ``qgraph inspect`` and
``qgraph optimize`` with exit code 2 and one line on stderr, before anything
is written and without opening a file outside the model's folder (a FIFO
outside the folder would block the process if it were opened). Bad
``qgraph generate`` arguments fail before the export. A compile killed in the
middle leaves no artifact, and the next one succeeds; two processes compiling
one model into one cache both succeed. A model folder's custom code never runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.errors import InvalidModelError, ModelLoadError, ModelSourceError
from qgraph.ir.graph import Graph
from qgraph.ir.validate import validate_model

ROOT = Path(__file__).parent.parent
OPTIMUM = Path(__file__).parent / "data" / "optimum-gpt2-2l" / "model.onnx"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qgraph.cli", *args]


def _run_all(
    commands: list[list[str]], env: dict[str, str] | None = None, timeout: float = 120, jobs: int = 3
) -> list[subprocess.CompletedProcess[str]]:
    """Run commands a few at a time (the machine is small); a command that hangs fails the test."""
    results: list[subprocess.CompletedProcess[str] | None] = [None] * len(commands)
    running: list[tuple[int, subprocess.Popen[str], float]] = []
    todo = list(enumerate(commands))
    while todo or running:
        while todo and len(running) < jobs:
            i, cmd = todo.pop(0)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ENV, cwd=ROOT)
            running.append((i, proc, time.monotonic()))
        i, proc, started = running.pop(0)
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"{commands[i]} did not finish in {timeout} s (did it open a FIFO?)") from None
        results[i] = subprocess.CompletedProcess(commands[i], proc.returncode, out, err)
    return results  # type: ignore[return-value]


def _assert_clean_error(res: subprocess.CompletedProcess[str], command: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1, f"expected one line on stderr:\n{res.stderr}"
    assert lines[0].startswith(f"qgraph {command}: error: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- malformed and hostile files


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
        commands += [_cli("inspect", str(path)), _cli("optimize", str(path), "-o", str(out))]
    results = _run_all(commands, timeout=90, jobs=4)
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


# --------------------------------------------------------------------------- custom ops pass through


def test_custom_domain_op_passes_through_optimize(tmp_path: Path) -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17, "com.example" : 1]>
    g (float[batch, 8] x) => (float[batch, 8] y) {
        a = Relu (x)
        b = com.example.MyOp <alpha = 0.5, mode = "fast"> (a)
        y = Relu (b)
    }
    """
    src = tmp_path / "custom.onnx"
    onnx.save(onnx.parser.parse_model(text), str(src))
    out = tmp_path / "out.onnx"
    res, res_json = _run_all([_cli("optimize", str(src), "-o", str(out), "--check"),
                              _cli("optimize", str(src), "-o", str(tmp_path / "out2.onnx"), "--json")])  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "note: 1 node(s) from custom domains left untouched: com.example.MyOp" in res.stdout
    for name in ("fold-constants", "fuse-layer-norm", "fuse-gelu", "retain-kv-cache", "cleanup"):
        assert name in res.stdout
    assert res_json.returncode == 0, res_json.stderr
    assert json.loads(res_json.stdout)["notes"] == ["1 node(s) from custom domains left untouched: com.example.MyOp"]
    model = onnx.load(str(out))
    (node,) = [n for n in model.graph.node if n.domain == "com.example"]
    assert node.op_type == "MyOp" and {a.name: helper.get_attribute_value(a) for a in node.attribute} == {"alpha": 0.5, "mode": b"fast"}
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producers[node.input[0]] == "Relu" and [n.op_type for n in model.graph.node if node.output[0] in n.input] == ["Relu"]
    assert {(o.domain, o.version) for o in model.opset_import} >= {("com.example", 1)}


def test_bad_optimize_arguments_and_paths_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    cases = {
        "ctx_len 0": (["optimize", str(OPTIMUM), "-o", str(tmp_path / "o.onnx"), "--ctx-len", "0"], "ctx_len must be at least 1, got 0"),
        "batch 0": (
            ["optimize", str(OPTIMUM), "-o", str(tmp_path / "o.onnx"), "--batch-size", "0", "--seq-len", "4"],
            "batch size must be at least 1",
        ),
        "output under a file": (["optimize", str(OPTIMUM), "-o", str(tmp_path / "a_file" / "o.onnx")], "check the path"),
        "a folder": (["inspect", str(tmp_path)], "no ONNX file at"),
        "missing argument": (["optimize", str(OPTIMUM)], "the following arguments are required: -o/--output"),
    }
    for (name, (args, message)), res in zip(cases.items(), _run_all([_cli(*args) for args, _ in cases.values()])):
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and "Traceback" not in res.stderr, f"{name}:\n{res.stderr}"
        assert last.startswith(f"qgraph {args[0]}: error: ") and message in last, f"{name}: {last}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_custom_op_named_like_an_onnx_op_is_not_fused() -> None:
    from qgraph.pipeline.optimize import optimize

    # A LayerNorm whose Sqrt is com.example.Sqrt (not ONNX's): fuse-layer-norm must leave it.
    text = """
    <ir_version: 10, opset_import: ["" : 17, "com.example" : 1]>
    g (float[2, 4] x) => (float[2, 4] y) <float eps = {1e-5}, float two = {2.0}> {
        m = ReduceMean <axes = [-1]> (x)
        d = Sub (x, m)
        p = Pow (d, two)
        v = ReduceMean <axes = [-1]> (p)
        ve = Add (v, eps)
        s = com.example.Sqrt (ve)
        y = Div (d, s)
    }
    """
    graph = Graph.parse(text)
    report = optimize(graph)
    assert [(n.op, n.domain) for n in graph.nodes if n.domain == "com.example"] == [("Sqrt", "com.example")]
    assert "LayerNormalization" not in graph.op_counts()
    assert report.notes == ["1 node(s) from custom domains left untouched: com.example.Sqrt"]


# --------------------------------------------------------------------------- bad generate arguments


def test_bad_generate_arguments_fail_before_any_work(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**ENV, "QGRAPH_HOME": str(home)}
    long_prompt = " ".join(["hello"] * 40)
    cases = {
        "no such model folder": (["--model", str(tmp_path / "missing"), "--input-ids", "1,2"], "no model folder"),
        "no such hub model": (["--model", "no-such-org/no-such-model-xyz", "--input-ids", "1,2"], "could not load the config"),
        "max_new_tokens 0": (["hi", "--max-new-tokens", "0"], "max_new_tokens must be at least 1, got 0"),
        "max_new_tokens -3": (["hi", "--max-new-tokens", "-3"], "max_new_tokens must be at least 1, got -3"),
        "prefill > ctx_len": (["hi", "--prefill-seq-len", "64", "--ctx-len", "32"], "prefill length 64 is larger than ctx_len 32"),
        "prompt too long": ([long_prompt, "--ctx-len", "16", "--prefill-seq-len", "8"], "leaves no room to generate in ctx_len 16"),
        "ids too long": (["--input-ids", ",".join(["1"] * 16), "--ctx-len", "16", "--prefill-seq-len", "8"], "prompt 0 has 16 tokens"),
        "unknown target": (["hi", "--target", "tpu"], "invalid choice: 'tpu'"),
        "empty prompt": ([""], "prompt 0 is empty"),
        "empty ids": (["--input-ids", ","], "prompt 0 is empty"),
        "bad temperature": (["hi", "--temperature", "-1"], "temperature must be >= 0"),
    }
    results = _run_all([_cli("generate", *args) for args, _ in cases.values()], env=env, jobs=3)
    for (name, (_, message)), res in zip(cases.items(), results):
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode != 0, f"{name}: exit 0"
        assert "Traceback" not in res.stderr, f"{name}:\n{res.stderr}"
        assert last.startswith("qgraph generate: error: ") and message in last, f"{name}: {last}"
        assert all(line.startswith("[qgraph] ") for line in res.stderr.strip().splitlines()[:-1]), f"{name}:\n{res.stderr}"
    assert not (home / "exports").exists() and not (home / "artifacts").exists(), "a bad argument got as far as the export"


def test_api_checks_the_target_and_options_before_exporting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qgraph import AutoModelForCausalLM
    from qgraph.runtime import GenerationError
    from qgraph.targets import TargetError

    monkeypatch.setenv("QGRAPH_HOME", str(tmp_path / "home"))
    model = AutoModelForCausalLM.from_pretrained("tiny-gpt2")
    with pytest.raises(TargetError, match="unknown target 'tpu'"):
        model.compile("tpu")
    with pytest.raises(TargetError, match="unknown option"):
        model.compile("cpu", soc_model=60)
    with pytest.raises(GenerationError, match="ctx_len must be at least 1"):
        model.compile(ctx_len=0)
    with pytest.raises(GenerationError, match="max_new_tokens must be at least 1"):
        model.generate(input_ids=[[1, 2]], max_new_tokens=0)
    with pytest.raises(GenerationError, match="prompt 0 is empty"):
        model.generate(input_ids=[[]])
    with pytest.raises(ModelSourceError, match="no model folder"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "nothing-here"))
    assert not (tmp_path / "home").exists()


# --------------------------------------------------------------------------- atomic outputs


def _kill_during_compile(out: Path) -> subprocess.Popen[str]:
    """Start ``qgraph compile`` and SIGKILL it once it is compiling the prefill graph."""
    for _ in range(3):
        cmd = _cli("compile", str(OPTIMUM), "--target", "cpu", "-o", str(out), "--prefill-seq-len", "4", "--ctx-len", "16")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        assert proc.stderr is not None
        for line in proc.stderr:
            if "compiling prefill" in line:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=120)
        if proc.returncode == -signal.SIGKILL:
            return proc
    pytest.fail("the compile always finished before it could be killed")


def test_a_killed_compile_leaves_no_artifact_and_a_rerun_succeeds(tmp_path: Path) -> None:
    parent = tmp_path / "artifacts"
    out = parent / "gpt2"
    _kill_during_compile(out)
    assert not out.exists()
    leftovers = list(parent.iterdir())
    assert leftovers and all(p.name.startswith(".gpt2.tmp-") for p in leftovers), leftovers
    # An hour later the leftover is stale: the next compile removes it.
    old = time.time() - 7200
    for p in leftovers:
        os.utime(p, (old, old))
    res = subprocess.run(_cli("compile", str(OPTIMUM), "--target", "cpu", "-o", str(out), "--prefill-seq-len", "4", "--ctx-len", "16"),
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [p.name for p in parent.iterdir()] == ["gpt2"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["hashes"]) == {p.name for p in out.iterdir() if p.name != "manifest.json"}


def test_two_compiles_into_one_folder_at_once(tmp_path: Path) -> None:
    out = tmp_path / "art"
    cmd = _cli("compile", str(OPTIMUM), "--target", "cpu", "-o", str(out), "--prefill-seq-len", "4", "--ctx-len", "16")
    for res in _run_all([cmd, cmd], jobs=2):
        assert res.returncode == 0, res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    from qgraph.runtime import Runtime

    assert Runtime(out).generate([[1, 2, 3]], max_new_tokens=3).tokens[0]


_COMPILE_SCRIPT = """
import json, sys
from qgraph import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
art = model.compile("cpu", prefill_seq_len=4, ctx_len=16)
out = model.generate(input_ids=[[3, 4, 5]], max_new_tokens=4)
print(json.dumps({"artifact": str(art), "onnx": str(model.onnx_path), "tokens": out.tokens}))
"""


def test_two_processes_share_one_cache(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from helpers import random_gpt2

    folder = tmp_path / "model"
    random_gpt2(folder, n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=32)
    env = {**ENV, "QGRAPH_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-c", _COMPILE_SCRIPT, str(folder)]
    a, b = _run_all([cmd, cmd], env=env, timeout=300, jobs=2)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra, rb = json.loads(a.stdout.splitlines()[-1]), json.loads(b.stdout.splitlines()[-1])
    assert ra == rb
    art = Path(ra["artifact"])
    assert sorted(p.name for p in art.parent.iterdir()) == sorted([art.name, art.name + ".lock"])
    manifest = json.loads((art / "manifest.json").read_text())
    from qgraph.artifact.manifest import sha256_file

    assert all(sha256_file(art / name) == digest for name, digest in manifest["hashes"].items())
    exports = Path(ra["onnx"]).parent
    assert [p.name for p in exports.iterdir()] == ["model.onnx"]


# --------------------------------------------------------------------------- nothing executes on load


_EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("code from the model folder ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""


def _evil_folder(folder: Path, marker: Path, model_type: str = "evil") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_evil.py").write_text(_EVIL_CODE.format(marker=str(marker)))
    (folder / "modeling_evil.py").write_text(_EVIL_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilModel"})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_in_a_model_folder_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    folder = _evil_folder(tmp_path / "evil", marker)
    results = _run_all([_cli("generate", "--model", str(folder), "--input-ids", "1,2"),
                        _cli("export", str(folder), "-o", str(tmp_path / "out.onnx"))], env={**ENV, "QGRAPH_HOME": str(tmp_path / "h")})  # fmt: skip
    for res, command in zip(results, ("generate", "export")):
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert last.startswith(f"qgraph {command}: error: ") and "evil" in last, last
    assert not marker.exists(), "code from the model folder ran"
    assert not (tmp_path / "out.onnx").exists()


def test_a_gpt2_folder_with_auto_map_loads_without_its_code(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from helpers import random_gpt2

    from qgraph.frontend.hf import load_model

    marker = tmp_path / "MARKER"
    folder = tmp_path / "gpt2"
    random_gpt2(folder, n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=32)
    _evil_folder(folder, marker, model_type="gpt2")
    model = load_model(str(folder))
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not marker.exists(), "code from the model folder ran"


def test_pickle_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from helpers import random_gpt2
    from safetensors.torch import load_file

    from qgraph.frontend.hf import load_model

    folder = tmp_path / "bin"
    random_gpt2(folder, n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=32)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    calls: list[object] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(ModelSourceError, match="no safetensors weights"):
        load_model(str(folder))
    assert not calls, "a pickle was loaded"


def test_no_code_runs_on_load_in_the_sources() -> None:
    # No pickle (or its relatives), eval/exec, torch.load, unsafe YAML, or trust_remote_code=True in the package and the passes.
    import ast

    banned_modules = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib"}
    banned_calls = {"eval", "exec", "torch.load", "yaml.load", "yaml.unsafe_load", "numpy.load", "np.load"}
    found = []
    for pkg in ("qgraph", "passes"):
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                where = f"{f.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                    found += [f"{where}: import {n}" for n in names if n.split(".")[0] in banned_modules]
                elif isinstance(node, ast.Call):
                    name = ast.unparse(node.func)
                    if name in banned_calls:
                        found.append(f"{where}: {name}()")
                    found += [f"{where}: trust_remote_code=True" for k in node.keywords
                              if k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is True]  # fmt: skip
    assert not found, found
