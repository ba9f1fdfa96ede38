"""Robustness: ops from custom domains pass through untouched, and none is mistaken for an ONNX op."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from helpers import cli_command, run_all
from onnx import helper

from qgraph.ir.graph import Graph


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
    # The passes named: the default pipeline refuses a graph without a KV cache (it cannot become the contract).
    passes = ("--passes", "fold-constants,fuse-layer-norm,fuse-gelu,cleanup,retain-kv-cache,cleanup")
    res, res_json = run_all([cli_command("optimize", str(src), "-o", str(out), "--check", *passes),
                              cli_command("optimize", str(src), "-o", str(tmp_path / "out2.onnx"), "--json", *passes)])  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "note: 1 node(s) from custom domains left untouched: com.example.MyOp" in res.stdout
    for name in ("fold-constants", "fuse-layer-norm", "fuse-gelu", "retain-kv-cache", "cleanup"):
        assert name in res.stdout
    assert res_json.returncode == 0, res_json.stderr
    assert "1 node(s) from custom domains left untouched: com.example.MyOp" in json.loads(res_json.stdout)["notes"]
    model = onnx.load(str(out))
    (node,) = [n for n in model.graph.node if n.domain == "com.example"]
    assert node.op_type == "MyOp" and {a.name: helper.get_attribute_value(a) for a in node.attribute} == {"alpha": 0.5, "mode": b"fast"}
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producers[node.input[0]] == "Relu" and [n.op_type for n in model.graph.node if node.output[0] in n.input] == ["Relu"]
    assert {(o.domain, o.version) for o in model.opset_import} >= {("com.example", 1)}


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
    report = optimize(graph, ["fold-constants", "fuse-layer-norm", "cleanup"])  # no KV cache: not the default pipeline
    assert [(n.op, n.domain) for n in graph.nodes if n.domain == "com.example"] == [("Sqrt", "com.example")]
    assert "LayerNormalization" not in graph.op_counts()
    assert report.notes == ["1 node(s) from custom domains left untouched: com.example.Sqrt"]
