"""The qaic target: its dry run writes the compiler's inputs and command (golden files)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
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


# --------------------------------------------------------------------------- the written files against the written model
def _symbolic_dims(model: Any) -> dict[str, set[str]]:
    """Every symbolic dim name of the model's inputs and outputs -> the IO names that use it."""
    dims: dict[str, set[str]] = {}
    for vi in [*model.graph.input, *model.graph.output]:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                dims.setdefault(d.dim_param, set()).add(vi.name)
    return dims


def _custom_io(text: str) -> list[tuple[str, str]]:
    """(IOName, Precision) pairs of a custom_io.yaml (the flat list qaic-exec reads)."""
    pairs: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("- IOName:"):
            pairs.append((line.split(":", 1)[1].strip(), ""))
        elif line.startswith("Precision:"):
            pairs[-1] = (pairs[-1][0], line.split(":", 1)[1].strip())
    return pairs


@pytest.fixture(scope="module")
def dry_run_b2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qaic") / "b2"
    return compile_model(RAW, "qaic", out, prefill_seq_len=8, ctx_len=32, batch_size=2, options={"kv_dtype": "float32"}, dry_run=True)


@pytest.mark.parametrize("which", ["dry_run", "dry_run_b2"])
def test_specializations_and_custom_io_match_the_written_model(which: str, request: pytest.FixtureRequest) -> None:
    art: Path = request.getfixturevalue(which)
    m = Manifest.load(art)
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    dims = _symbolic_dims(model)
    ids = next(vi for vi in model.graph.input if vi.name == "input_ids")
    batch, seq = (d.dim_param for d in ids.type.tensor_type.shape.dim)
    entries = json.loads((art / "specializations.json").read_text())["specializations"]
    assert len(entries) == len(m.specializations)
    for entry, spec in zip(entries, m.specializations):
        assert set(entry) == set(dims), f"specialization keys {sorted(entry)} != the model's symbolic dims {sorted(dims)}"
        assert (int(entry[batch]), int(entry[seq])) == (spec.batch_size, spec.seq_len)
    io = _custom_io((art / "custom_io.yaml").read_text())
    inputs = [vi.name for vi in model.graph.input]
    outputs = [vi.name for vi in model.graph.output]
    kv_in = [n for n in inputs if n.startswith(("past_key.", "past_value."))]
    assert [n for n, _ in io] == kv_in + [n + "_RetainedState" for n in kv_in]
    assert all(n in inputs or n in outputs for n, _ in io)
    want = {"float16": "float16", "float32": "float"}[m.options.target_options["kv_dtype"]]
    assert {p for _, p in io} == {want}


def test_a_pinned_graph_is_refused_in_one_line(tmp_path: Path) -> None:
    from qgraph.errors import QGraphError
    from qgraph.ir.graph import Graph
    from qgraph.pipeline.optimize import optimize

    g = Graph.load(RAW)
    optimize(g, ctx_len=64, batch_size=1, seq_len=16)
    g.save(tmp_path / "pinned.onnx")
    with pytest.raises(QGraphError, match="input_ids") as info:
        compile_model(tmp_path / "pinned.onnx", "qaic", tmp_path / "art", prefill_seq_len=16, ctx_len=64, dry_run=True)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "art").exists()


def test_a_dry_run_is_marked_and_never_run(dry_run: Path) -> None:
    from qgraph.artifact.manifest import ArtifactError
    from qgraph.runtime import Runtime

    assert json.loads((dry_run / "manifest.json").read_text())["dry_run"] is True
    assert Manifest.load(dry_run).dry_run
    with pytest.raises(ArtifactError, match="dry run"):
        Runtime(dry_run)


def test_qaic_compile_sh_is_executable_under_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        out = compile_model(RAW, "qaic", tmp_path / "art", prefill_seq_len=16, ctx_len=64, dry_run=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "qaic_compile.sh").stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "specializations.json").stat().st_mode) == 0o640
