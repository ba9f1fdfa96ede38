"""Robustness: atomic outputs and the shared cache.

A compile killed in the middle leaves no artifact, and the next one succeeds;
two compiles into one folder, and two processes compiling one model into one
cache, all succeed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ENV, OPTIMUM, ROOT, cli_command, run_all


def _kill_during_compile(out: Path) -> subprocess.Popen[str]:
    """Start ``qgraph compile`` and SIGKILL it once it is compiling the prefill graph."""
    for _ in range(3):
        cmd = cli_command("compile", str(OPTIMUM), "--target", "cpu", "-o", str(out), "--prefill-seq-len", "4", "--ctx-len", "16")
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
    res = subprocess.run(cli_command("compile", str(OPTIMUM), "--target", "cpu", "-o", str(out), "--prefill-seq-len", "4", "--ctx-len", "16"),
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [p.name for p in parent.iterdir()] == ["gpt2"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["hashes"]) == {p.name for p in out.iterdir() if p.name != "manifest.json"}


def test_two_compiles_into_one_folder_at_once(tmp_path: Path) -> None:
    out = tmp_path / "art"
    cmd = cli_command("compile", str(OPTIMUM), "--target", "cpu", "-o", str(out), "--prefill-seq-len", "4", "--ctx-len", "16")
    for res in run_all([cmd, cmd], jobs=2):
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
    a, b = run_all([cmd, cmd], env=env, timeout=300, jobs=2)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra, rb = json.loads(a.stdout.splitlines()[-1]), json.loads(b.stdout.splitlines()[-1])
    assert ra == rb
    art = Path(ra["artifact"])
    assert sorted(p.name for p in art.parent.iterdir()) == sorted([art.name, art.name + ".lock"])
    manifest = json.loads((art / "manifest.json").read_text())
    from qgraph.artifact.manifest import sha256_file

    assert all(sha256_file(art / name) == digest for name, digest in manifest["hashes"].items())
    exports = Path(ra["onnx"]).parent
    assert sorted(p.name for p in exports.iterdir()) == ["export.json", "model.onnx"]  # the export and its hashes


def test_an_artifact_replaces_only_an_artifact_or_an_empty_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An artifact is written whole over its folder: a folder of the user's files, a file, the working folder or an
    ancestor of it is refused in one line (it was replaced without a word: --artifacts ~ would have gone), before the
    work; an earlier artifact is replaced, and an empty folder is filled."""
    from qgraph.cli import main

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me too")
    compile_ = ["compile", str(OPTIMUM), "--target", "cpu", "--prefill-seq-len", "4", "--ctx-len", "16", "-o"]
    monkeypatch.chdir(user)
    for out, why in [(user, "holds files and is not a qgraph artifact (no manifest.json)"), (a_file, "is not a folder"),
                     (Path("."), "holds files and is not a qgraph artifact"), (tmp_path, "holds files and is not")]:  # fmt: skip
        assert main([*compile_, str(out)]) == 2
        assert f"qgraph compile: error: {out} {why}" in capsys.readouterr().err
    assert (user / "notes.txt").read_text() == "keep me" and a_file.read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "mine"]  # no temporary folder left either
    empty = user / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert main([*compile_, "."]) == 2  # empty, but the working folder
    assert "qgraph compile: error: . holds the working folder" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main([*compile_, str(empty)]) == 0 and (empty / "manifest.json").is_file()
    assert main([*compile_, str(empty)]) == 0  # an artifact is replaced by the next one
    assert (user / "notes.txt").read_text() == "keep me"
