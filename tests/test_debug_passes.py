"""The pass-debugging tool: stage dumps, the first bad pass, bisection, near misses, CLI.

One tiny random GPT-2 (2 layers) exported with TorchScript at opset 14, so the
fusions have several sites (decomposed LayerNorm x5, GELU x2).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import random_gpt2

from passes import FoldConstants, FuseLayerNorm
from qgraph import Graph, Pass, PassResult
from qgraph.devtools.debug import debug_passes, load_pass_module
from qgraph.errors import GraphCheckError, OptionError, UnknownPassError
from qgraph.pipeline.fusion import Match
from qgraph.pipeline.optimize import optimize

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "debug_passes.py"
CTX = 32
ATOL = 1e-3


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qgraph.frontend.export import export_model

    _, hf = random_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=61, n_positions=32)
    return export_model(hf, tmp_path_factory.mktemp("debug") / "ts14.onnx", exporter="torchscript", opset=14).path


class BreakWeight(Pass):
    """Scales the weight of the first Gemm/MatMul that reads a constant (a deliberate bug)."""

    name = "break-weight"

    def run(self, graph: Graph) -> PassResult:
        for node in graph.nodes:
            w = graph.const_value(node.inputs[1]) if node.op in ("Gemm", "MatMul") and len(node.inputs) > 1 else None
            if w is not None:
                node.inputs[1] = graph.constant(self.name, (w * 3.0).astype(w.dtype))
                return PassResult(graph, True, {"broken": 1})
        return PassResult(graph, False)


class BadThirdLayerNorm(FuseLayerNorm):
    """fuse-layer-norm whose third rewrite gets a wrong epsilon."""

    name = "fuse-layer-norm-bad3"

    def rewrite(self, graph: Graph, m: Match) -> None:
        if len(self.sites) == 3:  # the site is recorded before its rewrite
            m.values["eps"] = 0.5
        super().rewrite(graph, m)


DEFAULT = ["fold-constants", "fuse-layer-norm", "fuse-rms-norm", "fuse-gelu", "cleanup", "retain-kv-cache", "cleanup"]


def test_clean_pipeline_reports_no_bad_pass(model: Path, tmp_path: Path) -> None:
    report = debug_passes(model, ctx_len=CTX, out_dir=tmp_path / "out", atol=ATOL, threads=1)
    assert report.first_bad_pass is None and report.bisection is None, report.table()
    names = [s.name for s in report.stages]
    assert names[:6] == DEFAULT[:6]
    for s in report.stages:
        assert s.ok and s.error is None and s.max_abs_diff is not None and s.max_abs_diff < ATOL and s.top1_agrees, report.table()
        assert s.compared > 0
        assert (tmp_path / "out" / f"{s.index:03d}_{s.name}.onnxtxt").is_file()
        assert (tmp_path / "out" / f"{s.index:03d}_{s.name}.json").is_file()
    assert [s.signature for s in report.stages][4:6] == ["raw", "retained"]
    ln = report["fuse-layer-norm"]
    assert ln.stats == {"layer_norm": 5} and ln.added == {"LayerNormalization": 5} and ln.removed["ReduceMean"] == 10
    assert ln.nodes_after == ln.nodes_before - 40 and ln.sites == 5
    assert report["fuse-gelu"].stats == {"gelu_tanh": 2}
    # The dumps are ONNX text without weights, node names kept.
    text = (tmp_path / "out" / "002_fuse-layer-norm.onnxtxt").read_text()
    assert "LayerNormalization" in text and '"fuse-layer-norm/0"' in text and "ReduceMean" not in text
    assert len(text) < 200_000
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["first_bad_pass"] is None and len(data["passes"]) == len(report.stages)
    assert "every pass is within atol" in report.table()


def test_pinned_pipeline_and_a_retained_reference(model: Path, tmp_path: Path) -> None:
    # Pinned to seq_len 4: prefill in chunks of 4, decode padded to width 4.
    graph = Graph.load(model)
    report = debug_passes(graph, ctx_len=CTX, batch_size=2, seq_len=4, out_dir=None, atol=ATOL, threads=1)
    assert report.first_bad_pass is None, report.table()
    assert report["pin-static-shapes"].signature == "retained" and report.stages[-1].compared == 2 * 4
    # The result is a retained-state graph; it can be the reference too.
    path = graph.save(tmp_path / "retained.onnx")
    again = debug_passes(path, ["cleanup"], out_dir=None, atol=ATOL, threads=1)
    assert again.reference["signature"] == "retained" and again.inputs["batch"] == 2
    assert again.first_bad_pass is None and again.stages[0].max_abs_diff == 0.0, again.table()
    # Its cache length is fixed: another ctx_len is refused as compile and optimize refuse it (it ran, unchecked).
    for run in (lambda: debug_passes(path, ["cleanup"], ctx_len=CTX - 8, out_dir=None, atol=ATOL, threads=1),
                lambda: optimize(Graph.load(path), ctx_len=CTX - 8)):  # fmt: skip
        with pytest.raises(OptionError, match=f"the graph's cache holds {CTX} tokens but ctx_len {CTX - 8} was asked"):
            run()


def test_pinned_chunks_stay_inside_a_tight_cache(model: Path) -> None:
    # The cpu target's passes at batch 1: fuse-decode-attention's GroupQueryAttention fills slots p .. p+S-1 of a
    # padded decode step, and refuses a slot past the cache. With ctx 12 and S 4 the default 7 + 3 tokens would
    # decode position 9 over slots 9..12; the fixed inputs stop early instead of blaming the pass.
    passes = DEFAULT + ["pin-static-shapes", "cleanup", "fuse-attention", "simplify-shapes", "fuse-decode-attention"]
    report = debug_passes(model, passes, ctx_len=12, batch_size=1, seq_len=4, out_dir=None, atol=ATOL, threads=1)
    assert report.first_bad_pass is None, report.table()
    fused = report["fuse-decode-attention"]
    assert fused.stats.get("decode_attention") == 2 and fused.max_abs_diff < ATOL
    last = report.inputs["prompt_len"] + report.inputs["decode_steps"] - 1
    assert last + 4 <= 12 and report.inputs["decode_steps"] == 3
    with pytest.raises(GraphCheckError, match=r"chunks of 4 \(seq_len\); raise --ctx-len to at least 5"):
        debug_passes(model, passes, ctx_len=4, batch_size=1, seq_len=4, out_dir=None, atol=ATOL, threads=1)


def test_a_llama_graph_through_the_cpu_passes() -> None:
    # The real Optimum export of a Llama (RMSNorm, rotary, grouped KV heads repeated after the cache) at batch 1:
    # every pass within atol, each layer's grouped attention and cache writes one GroupQueryAttention.
    llama = Path(__file__).parent / "data" / "optimum-llama-2l" / "model.onnx"
    passes = DEFAULT + ["pin-static-shapes", "cleanup", "fuse-attention", "simplify-shapes", "fuse-decode-attention"]
    report = debug_passes(llama, passes, ctx_len=16, batch_size=1, seq_len=4, out_dir=None, atol=ATOL, threads=1)
    assert report.first_bad_pass is None, report.table()
    assert report["fuse-rms-norm"].stats == {"rms_norm": 5} and report["retain-kv-cache"].signature == "retained"
    assert report["fuse-decode-attention"].stats == {"decode_attention": 2}, report.table()
    assert all(s.max_abs_diff is not None and s.max_abs_diff < ATOL for s in report.stages)


@pytest.mark.parametrize("position", [1, 6], ids=["before-retain", "after-retain"])
def test_broken_pass_is_named(model: Path, position: int) -> None:
    passes: list[Any] = list(DEFAULT)
    passes.insert(position, BreakWeight())
    report = debug_passes(model, passes, ctx_len=CTX, out_dir=None, atol=ATOL, threads=1)
    assert report.first_bad_pass == "break-weight", report.table()
    bad = report.first_bad
    assert bad is not None and bad.index == position + 1 and bad.max_abs_diff is not None and bad.max_abs_diff > ATOL
    assert bad.signature == ("raw" if position <= DEFAULT.index("retain-kv-cache") else "retained")
    assert all(s.ok for s in report.stages[:position])
    assert report.bisection is None  # nothing to bisect: the pass has no match sites
    assert f"first bad pass: #{position + 1} break-weight" in report.table()


class Raises(Pass):
    name = "raises"

    def run(self, graph: Graph) -> PassResult:
        raise RuntimeError("boom")


def test_a_pass_that_raises_is_the_bad_pass(model: Path) -> None:
    report = debug_passes(model, ["fold-constants", Raises(), "cleanup"], ctx_len=CTX, out_dir=None, atol=ATOL, threads=1)
    assert report.first_bad_pass == "raises" and len(report.stages) == 2
    assert "RuntimeError: boom" in (report.stages[1].error or "") and "later passes did not run" in report.notes[0]


def test_bisection_names_the_bad_match_site(model: Path) -> None:
    # The site the bad pass breaks: the third one fuse-layer-norm rewrites.
    g = Graph.load(model)
    FoldConstants().run(g)
    clean = FuseLayerNorm()
    clean.run(g)
    assert len(clean.sites) == 5
    passes: list[Any] = ["fold-constants", BadThirdLayerNorm(), "fuse-gelu", "cleanup", "retain-kv-cache", "cleanup"]
    report = debug_passes(model, passes, ctx_len=CTX, out_dir=None, atol=ATOL, threads=1)
    assert report.first_bad_pass == "fuse-layer-norm-bad3", report.table()
    b = report.bisection
    assert b is not None and b.pass_name == "fuse-layer-norm-bad3" and b.n_sites == 5
    assert b.k == 3 and b.site == clean.sites[2], report.table()
    assert "Sqrt" in b.site_ops and "ReduceMean" in b.site_ops
    assert b.max_abs_diff is not None and b.max_abs_diff > ATOL and b.prev_max_abs_diff is not None and b.prev_max_abs_diff <= ATOL
    table = report.table()
    assert "match 3 of 5 of 'fuse-layer-norm-bad3'" in table and clean.sites[2][0] in table
    # The pass is left as the full run made it.
    stage = report["fuse-layer-norm-bad3"]
    assert stage.stats == {"layer_norm": 5} and stage.sites == 5


LN_TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
two_norms (float[2,3,8] x, float eps) => (float[2,3,8] y, float[2,3,8] z)
<float[8] gamma = {1,2,3,4,5,6,7,8}, float two = {2.0}, float three = {3.0}, float small = {0.00001}> {
    mean = ReduceMean <axes = [-1]> (x)
    d = Sub (x, mean)
    sq = Pow (d, two)
    var = ReduceMean <axes = [-1]> (sq)
    ve = Add (var, eps)
    s = Sqrt (ve)
    n = Div (d, s)
    y = Mul (n, gamma)
    mean2 = ReduceMean <axes = [-1]> (y)
    d2 = Sub (y, mean2)
    cube = Pow (d2, three)
    var2 = ReduceMean <axes = [-1]> (cube)
    ve2 = Add (var2, small)
    s2 = Sqrt (ve2)
    z = Div (d2, s2)
}
"""


def test_near_misses_say_why_a_norm_was_not_fused(tmp_path: Path) -> None:
    path = tmp_path / "norms.onnx"
    Graph.parse(LN_TEXT).save(path)
    report = debug_passes(path, ["fuse-layer-norm"], out_dir=tmp_path / "out", atol=ATOL, threads=1)
    stage = report["fuse-layer-norm"]
    assert report.first_bad_pass is None and not stage.modified and stage.signature == "generic"
    reasons = [m["reason"] for m in stage.near_misses]
    assert len(reasons) == 2, reasons
    assert "epsilon is not a constant (it is the graph input 'eps')" in reasons[0]
    assert "Pow exponent is 3, expected 2" in reasons[1]
    assert {m["op"] for m in stage.near_misses} == {"Sqrt"}
    table = report.table()
    assert "near misses" in table and "epsilon is not a constant" in table and "Pow exponent is 3, expected 2" in table
    assert stage.max_abs_diff == 0.0 and stage.top1_agrees is None


PASS_MODULE = '''
"""A third-party pass that flips the sign of the logits, editing graph.gs directly."""
import onnx_graphsurgeon as gs

from qgraph import Pass, PassResult


class FlipLogits(Pass):
    name = "flip-logits"

    def run(self, graph):
        g = graph.gs
        logits = next(t for t in g.outputs if t.name == "logits")
        node = logits.inputs[0]
        hidden = gs.Variable("flip-logits/0", dtype=logits.dtype)
        node.outputs[node.outputs.index(logits)] = hidden
        g.nodes.append(gs.Node("Neg", name="flip-logits/1", inputs=[hidden], outputs=[logits]))
        return PassResult(graph, True, {"flipped": 1})
'''


def test_cli_json_with_a_pass_module(model: Path, tmp_path: Path) -> None:
    module = tmp_path / "my_passes.py"
    module.write_text(PASS_MODULE)
    passes = "fold-constants,fuse-layer-norm,cleanup,retain-kv-cache,flip-logits,cleanup"
    cmd = [sys.executable, str(TOOL), str(model), "--json", "--pass-module", str(module), "--passes", passes,
           "--ctx-len", str(CTX), "--out", str(tmp_path / "out"), "--atol", str(ATOL)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert data["first_bad_pass"] == "flip-logits" and data["first_bad_index"] == 5
    assert [p["name"] for p in data["passes"]] == passes.split(",")
    for p in data["passes"]:
        for key in ("name", "modified", "stats", "max_abs_diff", "top1_agrees", "nodes_before", "nodes_after", "near_misses"):
            assert key in p, key
    flip = data["passes"][4]
    assert flip["modified"] is True and flip["stats"] == {"flipped": 1} and flip["nodes_after"] == flip["nodes_before"] + 1
    assert flip["top1_agrees"] is False and flip["max_abs_diff"] > ATOL and flip["added"] == {"Neg": 1}
    assert all(p["max_abs_diff"] < ATOL and p["top1_agrees"] for p in data["passes"][:4])
    assert data["passes"][1]["stats"] == {"layer_norm": 5}
    assert sorted(f.name for f in (tmp_path / "out").glob("005_*")) == ["005_flip-logits.json", "005_flip-logits.onnxtxt"]
    assert "[debug_passes]" in proc.stderr


def test_cli_table_and_errors(model: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(TOOL), str(model), "--passes", "fold-constants,no-such-pass", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown pass 'no-such-pass'" in lines[0] and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(TOOL), str(model), "--passes", "fold-constants,fuse-gelu", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^2\s+fuse-gelu\s+yes", proc.stdout, re.M) and "every pass is within atol" in proc.stdout


def test_pass_module_errors(tmp_path: Path) -> None:
    with pytest.raises(UnknownPassError, match="does not exist"):
        load_pass_module(tmp_path / "missing.py")
    empty = tmp_path / "empty.py"
    empty.write_text("from qgraph import Pass\nX = 1\n")
    with pytest.raises(UnknownPassError, match="defines no qgraph.Pass subclass"):
        load_pass_module(empty)


def test_generic_inputs_are_fixed() -> None:
    from qgraph.devtools.debug import fixed_inputs, signature

    g = Graph.parse(LN_TEXT)
    a = fixed_inputs(g, signature(g), batch_size=None, ctx_len=CTX)
    b = fixed_inputs(g, signature(g), batch_size=None, ctx_len=CTX)
    assert a.kind == "generic" and all(np.array_equal(a.feeds[k], b.feeds[k]) for k in a.feeds)
