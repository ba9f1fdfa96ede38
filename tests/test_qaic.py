"""The qaic target: its dry run writes the compiler's inputs and command (golden files)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qgraph.artifact.manifest import Manifest
from qgraph.compile import compile_model
from qgraph.targets import TargetError

RAW = Path(__file__).parent / "data" / "optimum-gpt2-2l" / "model.onnx"
GOLDEN = Path(__file__).parent / "golden" / "qaic"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qaic") / "art"
    return compile_model(RAW, "qaic", out, prefill_seq_len=16, ctx_len=64, batch_size=1, options={"num_cores": 14, "mxfp6_matmul": True},
                         dry_run=True)  # fmt: skip


@pytest.mark.parametrize("name", ["specializations.json", "custom_io.yaml", "qaic_compile.sh"])
def test_dry_run_files_match_golden(dry_run: Path, name: str, request: pytest.FixtureRequest) -> None:
    got = (dry_run / name).read_text()
    golden = GOLDEN / name
    if request.config.getoption("--update-golden"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(got)
    assert golden.is_file(), f"{golden} is missing; run pytest --update-golden"
    assert got == golden.read_text()


def test_dry_run_keeps_the_symbolic_graph(dry_run: Path) -> None:
    m = Manifest.load(dry_run)
    assert m.target == "qaic" and m.options.target_options["num_cores"] == 14
    assert (dry_run / "model.onnx").is_file()
    from qgraph.ir.graph import Graph

    g = Graph.load(dry_run / "model.onnx")
    assert g.inputs[0].shape[0] == "batch_size" and g.inputs[0].shape[1] == "sequence_length"


def test_without_the_sdk_it_says_so_and_points_to_dry_run(tmp_path: Path) -> None:
    if Path("/opt/qti-aic/exec/qaic-exec").exists():
        pytest.skip("the Cloud AI 100 SDK is installed here")
    with pytest.raises(TargetError, match="--dry-run"):
        compile_model(RAW, "qaic", tmp_path / "art", prefill_seq_len=16, ctx_len=64)
    assert not (tmp_path / "art").exists()


def test_cli_dry_run_prints_the_command(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "qgraph.cli", "compile", str(RAW), "--target", "qaic", "-o", str(tmp_path / "a"),
                          "--prefill-seq-len", "16", "--ctx-len", "64", "--dry-run"], capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (
        "qaic-exec" in res.stdout
        and "-retained-state" in res.stdout
        and "-network-specialization-config=specializations.json" in res.stdout
    )
