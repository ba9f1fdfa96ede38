"""The command line: inspect, export, optimize, generate, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import cli_command

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
    for name in ("fold-constants", "fuse-layer-norm", "fuse-rms-norm", "fuse-gelu", "retain-kv-cache", "cleanup", "total"):
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
    # The whole line: the file, its size in KiB or MiB (the bundled model is about 1 MiB), the dtype, the exporter, the opset.
    line = re.fullmatch(r"wrote (\S+) \(([\d.]+) (KiB|MiB), float32, torchscript exporter, opset \d+, [\d.]+ s\)", res.stdout.strip())
    assert line is not None, res.stdout
    assert Path(line[1]) == tmp_path / "tiny.onnx" and float(line[2]) > 0
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


# --------------------------------------------------------------------------- one line for every bad input (issue 17, item 10)
@pytest.fixture(scope="module")
def bundled_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A QGRAPH_HOME the tests that run the bundled model share (its export and artifact are made once)."""
    return tmp_path_factory.mktemp("bundled-home")


def _one_error_line(res: subprocess.CompletedProcess[str], command: str = "generate") -> str:
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert all(line.startswith("[qgraph] ") for line in lines[:-1]), res.stderr
    assert lines[-1].startswith(f"qgraph {command}: error: "), res.stderr
    return lines[-1]


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="the bundled model is missing")
def test_bad_inputs_are_one_line_before_any_work(tmp_path: Path) -> None:
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((BUNDLED / name).read_bytes())
    cases = {
        "temperature nan": (["hi", "--temperature", "nan"], "temperature must be >= 0 and finite (0 is greedy), got nan"),
        "temperature inf": (["hi", "--temperature", "inf"], "temperature must be >= 0 and finite (0 is greedy), got inf"),
        "seed -1": (["hi", "--temperature", "1", "--seed", "-1"], "seed must be an integer >= 0, got -1"),
        # The vocabulary size is the config's (1024): known before the export.
        "id out of the vocabulary": (["--input-ids", "1,1024"], "prompt 0 has token ids outside the vocabulary (0..1023): [1024]"),
        "negative id": (["--input-ids", "5,-1", "--input-ids", "1"], "prompt 0 has token ids outside the vocabulary (0..1023): [-1]"),
        "float ids": (["--input-ids", "1.5,2"], "--input-ids takes comma-separated integers"),
        "no tokenizer": (["hi", "--model", str(no_tokenizer)], "has no tokenizer"),
    }
    home = tmp_path / "home"
    for name, (args, message) in cases.items():
        last = _one_error_line(qgraph("generate", *args, home=home))
        assert message in last, f"{name}: {last}"
    last = _one_error_line(qgraph("generate", "hi", "--model", str(no_tokenizer), home=home))
    assert "--input-ids" in last, last  # says how to go on without a tokenizer
    assert not home.exists(), "a bad argument got as far as the export"
    # Token ids need no tokenizer.
    res = qgraph("generate", "--input-ids", "5,6", "--model", str(no_tokenizer), "--max-new-tokens", "2", "--json", home=home)
    assert res.returncode == 0 and len(json.loads(res.stdout)["tokens"][0]) == 2, res.stderr


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="the bundled model is missing")
def test_top_k_larger_than_the_vocabulary_keeps_every_token(bundled_home: Path) -> None:
    """Clamped as Hugging Face clamps it: the same seeded draw as no top-k at all."""
    runs = {}
    for top_k in ("0", "5000"):
        res = qgraph("generate", "Hi there!!", "--temperature", "0.8", "--seed", "3", "--top-k", top_k, "--max-new-tokens", "6", "--json",
                     home=bundled_home)  # fmt: skip
        assert res.returncode == 0, res.stderr
        runs[top_k] = json.loads(res.stdout)
    assert runs["5000"]["tokens"] == runs["0"]["tokens"] and runs["0"]["finish_reasons"] == ["length"]


def test_a_streamed_line_ends_before_the_warning_that_the_cache_is_full(bundled_home: Path) -> None:
    """A generation cut short by ctx_len warns after the streamed text's line, as a [qgraph] line of stderr (it came
    in the middle of the line, in logging's 'WARNING qgraph.runtime.runtime:' form)."""
    res = qgraph("generate", "Hi there!!", "--ctx-len", "16", "--max-new-tokens", "40", home=bundled_home)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Hi there!!") and "WARNING" not in res.stdout + res.stderr, res.stdout + res.stderr
    assert res.stderr.strip().splitlines()[-1] == ("[qgraph] warning: generation stopped at ctx_len 16 for 1 prompt(s); "
                                                   "compile with a larger --ctx-len for longer outputs")  # fmt: skip
    # Sampling's knobs without a temperature: greedy, said once (Hugging Face warns too).
    res = qgraph("generate", "Hi there!!", "--top-k", "5", "--max-new-tokens", "2", home=bundled_home)
    assert res.returncode == 0 and "[qgraph] warning: --top-k, --top-p and --seed shape sampling" in res.stderr, res.stderr


# --------------------------------------------------------------------------- stdout carries the result only (item 11)
@pytest.mark.skipif(not BUNDLED.is_dir(), reason="the bundled model is missing")
@pytest.mark.skipif(not importlib.util.find_spec("onnxruntime_qnn"), reason="onnxruntime-qnn is not installed")
def test_json_is_the_whole_stdout_with_the_qnn_target(tmp_path: Path, bundled_home: Path) -> None:
    """onnxruntime-qnn's native library prints "# LIBNATIVE: ..." on fd 1 when it loads: not into the JSON."""
    res = qgraph("generate", "Hi there!!", "--target", "qnn", "--max-new-tokens", "4", "--json", home=bundled_home)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)  # exactly one document
    assert data["target"] == "qnn" and len(data["tokens"][0]) == 4
    # compile prints its result line and nothing else.
    art = tmp_path / "qnn-art"
    res = qgraph("compile", str(OPTIMUM), "--target", "qnn", "-o", str(art), "--ctx-len", "32", "--prefill-seq-len", "8")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"wrote {art}\n"


def _writes_to_fd1(fn: Any) -> Any:
    """``fn``, which first writes to fd 1 below Python, as a native library does."""

    def noisy(*args: Any, **kwargs: Any) -> Any:
        os.write(1, b"# LIBNATIVE: native noise\n")
        return fn(*args, **kwargs)

    return noisy


def test_every_json_command_keeps_native_output_off_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import qgraph.devtools.bench as bench
    import qgraph.ir.inspect as inspect_mod
    import qgraph.pipeline.optimize as optimize_mod
    from qgraph import cli

    class Report:
        def to_dict(self) -> dict[str, int]:
            return {"rounds": 1}

    monkeypatch.setattr(inspect_mod, "summarize", _writes_to_fd1(inspect_mod.summarize))
    monkeypatch.setattr(optimize_mod, "optimize", _writes_to_fd1(optimize_mod.optimize))
    monkeypatch.setattr(bench, "run_bench", _writes_to_fd1(lambda *a, **k: Report()))
    monkeypatch.setattr(bench, "write_json", lambda report, path: None)
    commands = {
        "inspect": ["inspect", str(OPTIMUM), "--json"],
        "optimize": ["optimize", str(OPTIMUM), "-o", str(tmp_path / "o.onnx"), "--ctx-len", "16", "--json"],
        "bench": ["bench", "--json", "--output", str(tmp_path / "b.json")],
    }
    for name, argv in commands.items():
        capfd.readouterr()
        assert cli.main(argv) == 0, name
        out, err = capfd.readouterr()
        assert isinstance(json.loads(out), dict), f"{name}: {out[:200]}"
        assert "# LIBNATIVE: native noise" in err, name  # moved to stderr, not lost
    # The process's stdout is restored afterwards.
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"


# --------------------------------------------------------------------------- offline hub errors (item 12)
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _no_network_env(tmp_path: Path) -> dict[str, str]:
    """The hub at a closed localhost port (connection refused at once), a fresh Hugging Face cache, offline flags off."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path / "hf"), "QGRAPH_HOME": str(tmp_path / "q")}


def test_an_unreachable_hub_fails_fast_in_one_line_that_says_how_to_work_offline(tmp_path: Path) -> None:
    # A refused connection: one line, no retry warnings (they used to come twice each, with 1+2+4+8+8 s of back-off between them).
    res = subprocess.run(cli_command("generate", "Hi", "--model", "gpt2"), capture_output=True, text=True, env=_no_network_env(tmp_path),
                         timeout=300)  # fmt: skip
    assert res.stderr.count("\n") == 1 and "Retry" not in res.stderr, res.stderr
    last = _one_error_line(res)
    assert "gpt2" in last and "cannot reach the Hugging Face hub" in last, last
    assert "HF_HUB_OFFLINE=1" in last and "local model folder" in last and "tiny-gpt2" in last, last


def test_an_unreachable_hub_is_asked_once(tmp_path: Path) -> None:
    # A hub that hangs up on every connection, counting them: the count, not a clock, says that nothing was retried.
    # One request may take two connections (the HTTP transport reconnects once at once); the old code took four.
    server = socket.create_server(("127.0.0.1", 0))
    connections = []

    def hang_up() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            connections.append(conn)
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    env = {**_no_network_env(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}"}
    try:
        res = subprocess.run(cli_command("generate", "Hi", "--model", "gpt2"), capture_output=True, text=True, env=env, timeout=300)
    finally:
        server.close()
    assert "cannot reach the Hugging Face hub" in _one_error_line(res)
    assert 1 <= len(connections) <= 2, f"{len(connections)} connections to the hub"


def test_an_unreachable_hub_uses_a_model_already_in_the_cache(tmp_path: Path) -> None:
    """A hub model's snapshot in the Hugging Face cache runs at once, its generation_config.json's EOS honoured (issue 17, item 19)."""
    torch = pytest.importorskip("torch")
    from helpers import random_gpt2

    env = _no_network_env(tmp_path)
    snapshot = Path(env["HF_HOME"]) / "hub" / "models--qgraph-test--tiny" / "snapshots" / ("0" * 40)
    _, hf = random_gpt2(snapshot, n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=32, initializer_range=0.3, seed=7)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    with torch.no_grad():
        free = hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 3:].tolist()
    k = next(i for i in range(1, 6) if free[i] not in free[:i])
    (snapshot / "generation_config.json").write_text(json.dumps({"eos_token_id": [free[k]]}))
    res = subprocess.run(cli_command("generate", "--model", "qgraph-test/tiny", "--input-ids", "1,2,3", "--max-new-tokens", "6", "--json"),
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["tokens"] == [free[: k + 1]] and data["finish_reasons"] == ["eos"]
    assert "Retry" not in res.stderr and res.stderr.count("cannot reach the Hugging Face hub") == 1, res.stderr


# --------------------------------------------------------------------------- options are refused or honoured (item 14)
def test_dry_run_is_refused_for_targets_that_compile_here(tmp_path: Path) -> None:
    for target in ("cpu", "qnn"):
        out = tmp_path / target
        last = _one_error_line(qgraph("compile", str(OPTIMUM), "--target", target, "-o", str(out), "--dry-run"), "compile")
        assert "--dry-run" in last and "qaic" in last, last
        assert not out.exists()


def test_generate_help_lists_only_the_options_of_its_targets() -> None:
    res = qgraph("generate", "--help")
    assert res.returncode == 0
    for flag in ("--threads", "--soc-model", "--fp16", "--allow-cpu-fallback"):
        assert flag in res.stdout
    for flag in ("--aic-hw-version", "--num-cores", "--mxfp6-matmul", "--kv-dtype"):
        assert flag not in res.stdout
    res = qgraph("compile", "--help")
    assert "--num-cores" in res.stdout and "--soc-model" in res.stdout
    res = qgraph("generate", "hi", "--num-cores", "4")
    assert res.returncode == 2 and "unrecognized arguments: --num-cores" in res.stderr


def test_debug_and_verbose_work_after_the_subcommand(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.onnx")
    for argv in (["--debug", "inspect", missing], ["inspect", missing, "--debug"], ["inspect", "--debug", missing]):
        res = qgraph(*argv)
        assert res.returncode != 0 and "Traceback" in res.stderr, argv
    out = str(tmp_path / "o.onnx")
    for argv in (["-v", "optimize", str(OPTIMUM), "-o", out], ["optimize", str(OPTIMUM), "-o", out, "-v"]):
        res = qgraph(*argv)
        assert res.returncode == 0 and "INFO qgraph.pipeline.manager" in res.stderr, res.stderr
    res = qgraph("optimize", str(OPTIMUM), "-o", out)
    assert "INFO" not in res.stderr
