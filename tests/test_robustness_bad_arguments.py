"""Robustness: bad arguments and paths are one-line errors, and bad ``qgraph generate`` arguments fail before the export."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ENV, OPTIMUM, cli_command, run_all

from qgraph.errors import ModelSourceError


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
    for (name, (args, message)), res in zip(cases.items(), run_all([cli_command(*args) for args, _ in cases.values()])):
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and "Traceback" not in res.stderr, f"{name}:\n{res.stderr}"
        assert last.startswith(f"qgraph {args[0]}: error: ") and message in last, f"{name}: {last}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_bad_generate_arguments_fail_before_any_work(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**ENV, "QGRAPH_HOME": str(home)}
    long_prompt = " ".join(["hello"] * 40)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
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
        "negative threads": (["hi", "--threads", "-3"], "threads must be an integer of at least 1"),
        "another target's flags": (
            ["hi", "--target", "cpu", "--fp16", "--soc-model", "60"],
            "--soc-model and --fp16 are for --target qnn, not --target cpu; drop them",
        ),
        "cpu's flag on qnn": (["hi", "--target", "qnn", "--threads", "2"], "--threads is for --target cpu, not --target qnn; drop it"),
        "artifacts in a user's folder": (["hi", "--artifacts", str(mine)], "holds files and is not a qgraph artifact"),
    }
    results = run_all([cli_command("generate", *args) for args, _ in cases.values()], env=env, jobs=3)
    for (name, (_, message)), res in zip(cases.items(), results):
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode != 0, f"{name}: exit 0"
        assert "Traceback" not in res.stderr, f"{name}:\n{res.stderr}"
        assert last.startswith("qgraph generate: error: ") and message in last, f"{name}: {last}"
        assert all(line.startswith("[qgraph] ") for line in res.stderr.strip().splitlines()[:-1]), f"{name}:\n{res.stderr}"
    assert not (home / "exports").exists() and not (home / "artifacts").exists(), "a bad argument got as far as the export"
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


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
