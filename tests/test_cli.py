"""The command line: inspect, export, optimize, generate, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

OPTIMUM = Path(__file__).parent / "data" / "optimum-gpt2-2l" / "model.onnx"
BUNDLED = Path(__file__).parent.parent / "qgraph" / "models" / "tiny-gpt2"


def qgraph(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if home is not None:
        env["QGRAPH_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "qgraph.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def test_inspect_text_and_json() -> None:
    res = qgraph("inspect", str(OPTIMUM))
    assert res.returncode == 0, res.stderr
    assert "past_key_values.0.key" in res.stdout and "symbolic dims: " in res.stdout and "ai.onnx 18" in res.stdout
    data = json.loads(qgraph("inspect", str(OPTIMUM), "--json").stdout)
    assert data["opsets"]["ai.onnx"] == 18 and data["ops"]["Softmax"] == 2
    assert data["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]}
    assert set(data["symbolic_dims"]) >= {"batch_size", "sequence_length", "past_sequence_length"}
    assert data["weights_bytes"] > 100_000


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    res = qgraph("inspect", str(tmp_path / "missing.onnx"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert "no ONNX file" in res.stderr
    res = qgraph("--debug", "inspect", str(tmp_path / "missing.onnx"))
    assert "Traceback" in res.stderr


def test_optimize_prints_the_report(tmp_path: Path) -> None:
    out = tmp_path / "opt.onnx"
    res = qgraph("optimize", str(OPTIMUM), "-o", str(out), "--ctx-len", "32", "--check")
    assert res.returncode == 0, res.stderr
    for name in ("fold-constants", "fuse-layer-norm", "fuse-gelu", "retain-kv-cache", "cleanup", "total"):
        assert name in res.stdout
    assert "pin-static-shapes" not in res.stdout  # no --batch-size / --seq-len: shapes stay symbolic
    res = qgraph("optimize", str(OPTIMUM), "-o", str(out), "--batch-size", "1", "--seq-len", "4", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert [p["name"] for p in report["passes"]][-2] == "pin-static-shapes"
    res = qgraph("optimize", str(OPTIMUM), "-o", str(out), "--passes", "fuse-gelu,no-such-pass")
    assert res.returncode == 2 and "unknown pass 'no-such-pass'" in res.stderr


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="the bundled model is missing")
def test_export_bundled_model_offline(tmp_path: Path) -> None:
    res = qgraph("export", "tiny-gpt2", "-o", str(tmp_path / "tiny.onnx"), "--exporter", "torchscript")
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and "tiny.onnx" in res.stdout and "KiB" in res.stdout or "MiB" in res.stdout
    assert (tmp_path / "tiny.onnx").is_file()


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="the bundled model is missing")
def test_generate_json_on_the_bundled_model(tmp_path: Path) -> None:
    res = qgraph("generate", "Hi there!!", "--max-new-tokens", "8", "--json", home=tmp_path / "home")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert set(data) >= {"tokens", "text", "stats", "target", "artifacts"}
    assert len(data["tokens"][0]) == 8 and isinstance(data["text"][0], str) and data["target"] == "cpu"
    assert data["stats"]["decode_tokens_per_s"] > 0
    # The second run reuses the cached export and artifact.
    res2 = qgraph("generate", "Hi there!!", "--max-new-tokens", "8", "--json", home=tmp_path / "home")
    assert json.loads(res2.stdout)["tokens"] == data["tokens"]
    assert "using the cached artifact" in res2.stderr
