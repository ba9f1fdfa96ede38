"""Tests of the raw export (qgraph.frontend.export) and model sources (qgraph.frontend.hf).

Each exporter configuration exports one random tiny GPT-2 once per module; the
tests check the IO contract and that ONNX Runtime matches Hugging Face PyTorch
for a prefill with an empty past and for a decode step fed the presents.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from helpers import ENV, cli_command, ort_run, random_gpt2

import qgraph.ir.graph
from qgraph.errors import ExportError, ModelSourceError
from qgraph.frontend.export import ExportResult, export_model, io_names
from qgraph.frontend.hf import BUNDLED_DIR, check_supported, load_config, load_model, resolve_model

ATOL = 1e-4
BATCH, SEQ = 2, 5
CONFIGS = [("dynamo", None), ("dynamo", 18), ("torchscript", None), ("torchscript", 14)]


@pytest.fixture(scope="module")
def gpt2() -> tuple[Any, Any]:
    return random_gpt2(n_layer=2, n_head=3, n_embd=48, vocab_size=397, n_positions=64)


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"{c[0]}-opset{c[1] or 'default'}")
def exported(
    request: pytest.FixtureRequest, gpt2: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[ExportResult, list[str]]:
    exporter, opset = request.param
    lines: list[str] = []
    out = tmp_path_factory.mktemp(exporter) / "model.onnx"
    result = export_model(gpt2[1], out, exporter=exporter, opset=opset, progress=lines.append)
    return result, lines


def _hf_step(model: Any, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, cache: Any = None) -> tuple[np.ndarray, list[np.ndarray], Any]:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(pos),
            past_key_values=cache,
            use_cache=True,
        )
    presents = [t.numpy().copy() for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
    return out.logits.numpy(), presents, out.past_key_values


def test_contract(exported: tuple[ExportResult, list[str]], gpt2: tuple[Any, Any]) -> None:
    result, lines = exported
    config = gpt2[0]
    assert (result.spec.num_layers, result.spec.num_kv_heads, result.spec.head_dim, result.spec.vocab_size) == (2, 3, 16, 397)
    model = onnx.load(str(result.path))
    assert result.opset == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert result.size_bytes == result.path.stat().st_size
    inputs, outputs = io_names(config.n_layer)
    assert [i.name for i in model.graph.input] == inputs
    assert [o.name for o in model.graph.output] == outputs

    def dims(v: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    def elem(v: onnx.ValueInfoProto) -> int:
        return v.type.tensor_type.elem_type

    ins = {v.name: v for v in model.graph.input}
    outs = {v.name: v for v in model.graph.output}
    for name in ("input_ids", "position_ids"):
        assert dims(ins[name]) == ["batch", "seq_len"] and elem(ins[name]) == onnx.TensorProto.INT64
    assert dims(ins["attention_mask"]) == ["batch", "total_len"] and elem(ins["attention_mask"]) == onnx.TensorProto.INT64
    for name in inputs[3:]:
        assert dims(ins[name]) == ["batch", 3, "past_len", 16] and elem(ins[name]) == onnx.TensorProto.FLOAT
    assert dims(outs["logits"]) == ["batch", "seq_len", 397]
    for name in outputs[1:]:
        assert dims(outs[name]) == ["batch", 3, "total_len", 16] and elem(outs[name]) == onnx.TensorProto.FLOAT
    assert len(lines) >= 3 and any(result.exporter in line for line in lines)


def test_prefill_and_decode_match_hf(exported: tuple[ExportResult, list[str]], gpt2: tuple[Any, Any]) -> None:
    result = exported[0]
    config, model = gpt2
    rng = np.random.default_rng(0)
    inputs, outputs = io_names(config.n_layer)
    empty = np.zeros((BATCH, config.n_head, 0, config.n_embd // config.n_head), np.float32)

    ids = rng.integers(0, config.vocab_size, (BATCH, SEQ), dtype=np.int64)
    mask = np.ones((BATCH, SEQ), np.int64)
    pos = np.tile(np.arange(SEQ, dtype=np.int64), (BATCH, 1))
    got = ort_run(result.path, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **{n: empty for n in inputs[3:]}})
    logits, presents, cache = _hf_step(model, ids, mask, pos)
    np.testing.assert_allclose(got["logits"], logits, atol=ATOL)
    for name, want in zip(outputs[1:], presents, strict=True):
        np.testing.assert_allclose(got[name], want, atol=ATOL, err_msg=name)

    # One decode step, the presents fed back as the past.
    ids = rng.integers(0, config.vocab_size, (BATCH, 1), dtype=np.int64)
    mask = np.ones((BATCH, SEQ + 1), np.int64)
    pos = np.full((BATCH, 1), SEQ, np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    feeds.update({i: got[o] for i, o in zip(inputs[3:], outputs[1:], strict=True)})
    got = ort_run(result.path, feeds)
    logits, presents, _ = _hf_step(model, ids, mask, pos, cache)
    np.testing.assert_allclose(got["logits"], logits, atol=ATOL)
    for name, want in zip(outputs[1:], presents, strict=True):
        assert got[name].shape[2] == SEQ + 1
        np.testing.assert_allclose(got[name], want, atol=ATOL, err_msg=name)


def test_dynamo_rejects_old_opset(gpt2: tuple[Any, Any], tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="starts at opset 18.*--exporter torchscript"):
        export_model(gpt2[1], tmp_path / "m.onnx", exporter="dynamo", opset=14)
    with pytest.raises(ExportError, match="unknown exporter"):
        export_model(gpt2[1], tmp_path / "m.onnx", exporter="jit")
    assert not any(tmp_path.iterdir())


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no model folder"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelSourceError, match="hub id"):
        resolve_model("not a model!")
    assert resolve_model("openai-community/gpt2").kind == "hub"
    with pytest.raises(ModelSourceError, match="'gpt2', 'llama'"):
        check_supported(types.SimpleNamespace(model_type="bert"))


def test_bundled_model_resolves() -> None:
    # The bundled model may not be trained yet in a fresh checkout.
    if (BUNDLED_DIR / "tiny-gpt2" / "config.json").is_file():
        source = resolve_model("tiny-gpt2")
        assert source.kind == "bundled" and source.path == BUNDLED_DIR / "tiny-gpt2"
    else:
        with pytest.raises(ModelSourceError, match="bundled model 'tiny-gpt2' is missing"):
            resolve_model("tiny-gpt2")


def test_local_folder_export_with_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "hf"
    config, model = random_gpt2(folder, n_layer=1, seed=1)
    source = resolve_model(str(folder))
    assert source.kind == "local" and load_config(source).n_layer == 1
    loaded = load_model(source)
    assert not loaded.training
    # Every weight over 1 KB goes to <name>.onnx.data when the model is "large".
    monkeypatch.setattr(qgraph.ir.graph, "EXTERNAL_DATA_THRESHOLD", 0)
    result = export_model(str(folder), tmp_path / "out" / "model.onnx", exporter="torchscript")
    data = result.path.with_name("model.onnx.data")
    assert data.is_file() and result.size_bytes == result.path.stat().st_size + data.stat().st_size
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]

    inputs, _ = io_names(1)
    ids = np.array([[1, 2, 3]], np.int64)
    empty = np.zeros((1, config.n_head, 0, config.n_embd // config.n_head), np.float32)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(3, dtype=np.int64)[None]}
    got = ort_run(result.path, {**feeds, **{n: empty for n in inputs[3:]}}, ["logits"])
    logits, _, _ = _hf_step(model, ids, feeds["attention_mask"], feeds["position_ids"])
    np.testing.assert_allclose(got["logits"], logits, atol=ATOL)


def test_modules_import_without_torch() -> None:
    code = "import sys, qgraph.frontend.hf, qgraph.frontend.export; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_an_exporter_that_cannot_trace_the_model_says_why_in_one_line(tmp_path: Path) -> None:
    """``qgraph export`` of a Llama with dynamic NTK rope (its angles depend on the length: torch.export cannot trace
    that) with the dynamo exporter: the error names the expression from torch's innermost exception (torch.onnx's own
    first line is 'Failed to export ...', in colour codes), and the hundreds of lines torch prints from C++ and its
    loggers about the failed trace stay out of the console (in the debug log). A process of its own: torch's log
    handlers write to the streams they were made with, which under pytest are pytest's."""
    from qgraph.frontend.families import FAMILIES

    fields = dict(hidden_size=64, num_hidden_layers=1, intermediate_size=96, vocab_size=211, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0})  # fmt: skip
    folder = FAMILIES["llama"].save_random(fields, tmp_path / "hf", seed=1)
    res = subprocess.run(cli_command("export", str(folder), "-o", str(tmp_path / "d.onnx"), "--exporter", "dynamo"),
                         capture_output=True, text=True, env=ENV, timeout=600)  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    (message,) = [line for line in res.stderr.splitlines() if "error" in line]
    assert message.startswith("qgraph export: error: the dynamo exporter failed ("), message
    assert message.endswith("); try --exporter torchscript"), message
    assert "\x1b" not in message and "Failed to export" not in message, message
    assert "data-dependent" in message, message  # torch's reason: a guard on a value known only at run time
    assert len((res.stdout + res.stderr).splitlines()) < 10, (res.stdout + res.stderr)[-3000:]
