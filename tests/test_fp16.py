"""float16 models end to end: asked for with ``--dtype float16`` (export, generate, the API), rewritten by the
passes, compiled for cpu and qnn, and generating: logits against Hugging Face in float16 at every step, tokens
against Hugging Face in float16 and in float32.

Tolerance: the graph computes in float16 (unit roundoff 2**-11, about 4.9e-4) on both sides, but ONNX Runtime
and PyTorch round at different places (ORT's CPU provider runs most float16 nodes in float32 between the Casts it
inserts, the HTP has its own kernels). The logits reach about 6 here, where float16
values are 2**-8 (0.004) apart; the largest difference from Hugging Face float16 measured over these prompts
was 0.01 (cpu) and 0.017 (qnn), a few units in the last place. ATOL16 = 0.06 leaves a 3.5x margin and is still
far below what a wrong cache slot or position does to these logits (1 and more: measured with the decode
position frozen, one too high, and the prompt's chunks starting one too late). The float32 tokens agree
because the float32 greedy path's top-2 gap is at least 0.2 at every step here, over 3x ATOL16 (asserted):
no rounding of that size can swap the two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import ENV, cli_command, generate_recording_logits, hf_greedy, hf_logits_along, random_gpt2, run_all

from qgraph import AutoModelForCausalLM
from qgraph.compile import compile_model
from qgraph.errors import ExportError
from qgraph.ir.graph import Constant, Graph
from qgraph.pipeline.optimize import optimize
from qgraph.runtime import Runtime
from qgraph.targets import qnn

torch = pytest.importorskip("torch")

needs_qnn = pytest.mark.skipif(not qnn.qnn_available(), reason="onnxruntime-qnn is not installed (pip install 'qgraph[qnn]')")

ATOL16 = 0.06  # see the module docstring
PREFILL, CTX, NEW = 8, 48, 12
# One prompt of two chunks; each prompt's float32 greedy path has a top-2 gap of at least 0.2 at every step.
PROMPTS = [[153, 177, 36, 18, 181, 4, 113, 16, 62, 101, 88, 84, 5], [81, 183, 28], [47, 26, 26, 163, 60]]
CONFIG: dict[str, Any] = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=211, n_positions=64, seed=7, initializer_range=0.3)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """A random GPT-2 saved in float32, and Hugging Face's float32 and float16 models of it."""
    from qgraph.frontend.hf import load_model

    folder = tmp_path_factory.mktemp("model") / "gpt2"
    _, hf32 = random_gpt2(folder, **CONFIG)
    return folder, hf32, load_model(str(folder), "float16")


@pytest.fixture(scope="module")
def generated(models: tuple[Path, Any, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """``qgraph generate --model FOLDER --dtype float16 --json`` in a fresh QGRAPH_HOME: its JSON, and the home."""
    home = tmp_path_factory.mktemp("home")
    ids = [a for p in PROMPTS for a in ("--input-ids", ",".join(map(str, p)))]
    cmd = cli_command("generate", "--model", str(models[0]), "--dtype", "float16", *ids, "--max-new-tokens", str(NEW),
                      "--ctx-len", str(CTX), "--prefill-seq-len", str(PREFILL), "--json")  # fmt: skip
    (res,) = run_all([cmd], env={**ENV, "QGRAPH_HOME": str(home)}, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), home


@pytest.fixture(scope="module")
def raw16(generated: tuple[dict[str, Any], Path]) -> Path:
    """The float16 export that generate made (and cached)."""
    (path,) = (generated[1] / "exports").glob("*/model.onnx")
    return path


def test_generate_dtype_float16_gives_hugging_faces_float16_and_float32_tokens(
    generated: tuple[dict[str, Any], Path], models: tuple[Path, Any, Any]
) -> None:
    data = generated[0]
    _, hf32, hf16 = models
    assert data["tokens"] == [hf_greedy(hf16, p, NEW, distinct=5) for p in PROMPTS]
    assert data["tokens"] == [hf_greedy(hf32, p, NEW) for p in PROMPTS]
    assert json.loads((Path(data["artifacts"]) / "manifest.json").read_text())["model"]["dtype"] == "float16"


def test_the_float16_export_is_float16(raw16: Path) -> None:
    graph = Graph.load(raw16)
    kinds = {t.name: np.dtype(t.dtype) for t in graph.inputs + graph.outputs}
    floats = {n for n in kinds if n.startswith(("past_", "present_", "logits"))}
    assert {k: v for k, v in kinds.items() if v != np.int64} == dict.fromkeys(floats, np.float16)
    weights = [graph.const_value(t) for t in graph.tensors().values() if isinstance(t, Constant) and t.shape and np.prod(t.shape) > 64]
    assert weights and {w.dtype for w in weights} == {np.dtype(np.float16)}


def test_the_cache_keys_the_dtype(models: tuple[Path, Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One cached export per dtype, each made in its dtype (by a stand-in exporter here), and reused."""
    import qgraph.frontend.export as export

    monkeypatch.setenv("QGRAPH_HOME", str(tmp_path))
    asked: list[Any] = []

    def fake_export(model: Any, out: Path, **kwargs: Any) -> None:
        asked.append(kwargs["dtype"])
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"")

    monkeypatch.setattr(export, "export_model", fake_export)
    float16 = AutoModelForCausalLM.from_pretrained(str(models[0]), dtype="float16").export()
    float32 = AutoModelForCausalLM.from_pretrained(str(models[0])).export()
    assert float16 != float32 and asked == ["float16", "float32"]
    assert AutoModelForCausalLM.from_pretrained(str(models[0]), dtype="float16").export() == float16 and len(asked) == 2
    with pytest.raises(ExportError, match="dtype must be float32 or float16, not 'float64'"):
        AutoModelForCausalLM.from_pretrained(str(models[0]), dtype="float64")


def test_export_takes_a_dtype_and_refuses_others(models: tuple[Path, Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import qgraph.frontend.export as export
    from qgraph.cli import main

    asked: list[Any] = []
    monkeypatch.setattr(export, "export_model", lambda model, out, **kw: asked.append(kw["dtype"]) or _Result(Path(out)))
    assert main(["export", str(models[0]), "-o", str(tmp_path / "m.onnx"), "--dtype", "float16"]) == 0
    assert asked == ["float16"] and "float16" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["export", str(models[0]), "-o", str(tmp_path / "m.onnx"), "--dtype", "int8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'int8'" in err
    monkeypatch.undo()
    with pytest.raises(ExportError, match="dtype must be float32 or float16, not 'bfloat16'"):
        export.export_model(str(models[0]), tmp_path / "m.onnx", dtype="bfloat16")
    with pytest.raises(ExportError, match="the model is float32, not the float16 asked for; convert it first"):
        export.export_model(models[1], tmp_path / "m.onnx", dtype="float16")
    assert not list(tmp_path.iterdir())


class _Result:
    """What the CLI prints of an export (a stand-in for ExportResult)."""

    def __init__(self, path: Path) -> None:
        self.path, self.size_bytes, self.exporter, self.opset, self.seconds, self.dtype = path, 1024, "dynamo", 18, 0.1, "float16"


def test_a_float16_model_through_torchscript_fails_in_one_line(models: tuple[Path, Any, Any], tmp_path: Path) -> None:
    """TorchScript writes GPT-2 in float16 with a float32 residual that LayerNormalization rejects (an invalid graph)."""
    from qgraph.frontend.export import export_model

    with pytest.raises(ExportError, match="the torchscript exporter wrote an invalid graph .*; try --exporter dynamo") as e:
        export_model(str(models[0]), tmp_path / "m.onnx", exporter="torchscript", dtype="float16")
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


def test_the_passes_on_the_float16_graph(raw16: Path) -> None:
    """The rewrite stage fires on float16 as on float32; the retained mask is float16 and finite (-10000 hides a
    slot: exp underflows to 0, and adding scores cannot overflow float16); clip-fp16 has nothing to clamp."""
    graph = Graph.load(raw16)
    report = optimize(graph, ctx_len=CTX)
    stats = {p.name: p.stats for p in report.records}
    assert stats["fuse-gelu"] == {"gelu_tanh": 2} and stats["retain-kv-cache"]["layers"] == 2
    masks = [n for n in graph.nodes if n.op == "Where" and n.name.startswith("retain-kv-cache/") and isinstance(n.inputs[2], Constant)]
    assert masks and all(graph.const_value(m.inputs[2]).dtype == np.float16 for m in masks)
    assert {float(graph.const_value(m.inputs[2])) for m in masks} == {-10000.0}
    for t in graph.tensors().values():
        if isinstance(t, Constant) and np.dtype(t.dtype) == np.float16:
            assert np.isfinite(graph.const_value(t)).all(), t.name
    clip = optimize(graph, ["clip-fp16"], ctx_len=CTX)
    assert not clip.records[0].modified


def _check_artifact(art: Path, hf32: Any, hf16: Any) -> None:
    out, logits = generate_recording_logits(Runtime(art), PROMPTS, NEW)
    assert out.tokens == [hf_greedy(hf16, p, NEW, distinct=5) for p in PROMPTS]
    for i, (prompt, toks, got) in enumerate(zip(PROMPTS, out.tokens, logits, strict=True)):
        assert len(got) == len(toks)
        want = hf_logits_along(hf16, prompt, toks)
        for k, (g, w) in enumerate(zip(got, want)):
            np.testing.assert_allclose(g, w, atol=ATOL16, rtol=0, err_msg=f"prompt {i}, step {k} (0: after the prompt)")
        ref32 = hf_logits_along(hf32, prompt, toks)
        top2 = np.sort(ref32, axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 3 * ATOL16  # so float16 rounding cannot swap the float32 argmax
        assert toks == hf_greedy(hf32, prompt, NEW)


def test_cpu_float16_matches_hugging_face_at_every_step(raw16: Path, models: tuple[Path, Any, Any], tmp_path: Path) -> None:
    """Two rows (a padded row, a prompt of two chunks, a second group): the float16 logits buffer and caches."""
    art = compile_model(raw16, "cpu", tmp_path / "cpu", prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=2)
    _check_artifact(art, models[1], models[2])


@needs_qnn
def test_qnn_float16_matches_hugging_face_at_every_step(raw16: Path, models: tuple[Path, Any, Any], tmp_path: Path) -> None:
    """Every node on the HTP (the compile fails otherwise); the model is float16 itself, so --fp16 is not needed."""
    art = compile_model(raw16, "qnn", tmp_path / "qnn", prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=1)
    _check_artifact(art, models[1], models[2])
