"""Trust in artifacts and the cache: content hashes checked on open, files confined to
the artifact directory, one line for a damaged artifact, a damaged cache entry
rebuilt, a read-only cache usable, and keys that change with the libraries' versions.

The models are random GPT-2s with initializer_range 0.3, whose greedy output
varies (default init repeats one token and would hide a wrong cache).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import ENV, ROOT, random_gpt2

from qgraph.artifact.manifest import ArtifactError
from qgraph.runtime import Runtime

torch = pytest.importorskip("torch")

SHAPE: dict[str, Any] = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=48, initializer_range=0.3)
PROMPT = [3, 4, 5, 6]
NEW = 8
OPTS: dict[str, Any] = dict(prefill_seq_len=8, ctx_len=32, batch_size=1)


def _hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=model.config.eos_token_id)  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, list[int]]:
    """A saved random GPT-2 folder, the model, and its greedy tokens for PROMPT (several distinct ones)."""
    folder = tmp_path_factory.mktemp("model") / "gpt2"
    _, model = random_gpt2(folder, seed=3, **SHAPE)
    ref = _hf_greedy(model, PROMPT, NEW)
    assert len(set(ref)) >= 3, f"the reference repeats itself ({ref}); it could not show a wrong cache"
    return folder, model, ref


@pytest.fixture(scope="module")
def artifact(hf: tuple[Path, Any, list[int]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cpu artifact compiled into an explicit directory (no cache)."""
    from qgraph.compile import compile_model
    from qgraph.frontend.export import export_model

    raw = export_model(hf[1], tmp_path_factory.mktemp("export") / "raw.onnx", exporter="torchscript").path
    return compile_model(raw, "cpu", tmp_path_factory.mktemp("art") / "cpu", **OPTS)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QGRAPH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "home"


# --------------------------------------------------------------------------- damage
def _manifest(art: Path) -> dict[str, Any]:
    return json.loads((art / "manifest.json").read_text())


def _edit_manifest(art: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = _manifest(art)
    edit(data)
    (art / "manifest.json").write_text(json.dumps(data))


def _flip(path: Path, n: int = 4096) -> None:
    """Invert ``n`` bytes (4 KiB, or what the file has) from a quarter of the way in."""
    data = bytearray(path.read_bytes())
    start = len(data) // 4
    end = min(len(data), start + n)
    data[start:end] = bytes(b ^ 0xFF for b in data[start:end])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _garbage_graph(art: Path) -> None:
    """A decode.onnx that is not ONNX, with a manifest hash that matches it (so only loading it can fail)."""
    (art / "decode.onnx").write_bytes(b"not an onnx model " * 64)
    _edit_manifest(art, lambda d: d["hashes"].update({"decode.onnx": _sha256(art / "decode.onnx")}))


#: How an artifact is damaged, and the file the one-line error must name.
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "flipped-weights": (lambda a: _flip(a / "weights.data"), "weights.data"),
    "truncated-weights": (lambda a: _truncate(a / "weights.data"), "weights.data"),
    "truncated-graph": (lambda a: _truncate(a / "decode.onnx"), "decode.onnx"),
    "missing-graph": (lambda a: (a / "decode.onnx").unlink(), "decode.onnx"),
    "zeroed-hashes": (lambda a: _edit_manifest(a, lambda d: d.update(hashes={k: "0" * 64 for k in d["hashes"]})), "decode.onnx"),
    "no-hashes": (lambda a: _edit_manifest(a, lambda d: d.pop("hashes")), "manifest.json"),
    "weights-not-hashed": (lambda a: _edit_manifest(a, lambda d: d["hashes"].pop("weights.data")), "weights.data"),
    "truncated-manifest": (lambda a: _truncate(a / "manifest.json"), "manifest.json"),
    "garbage-graph": (_garbage_graph, "decode.onnx"),
    "fifo-weights": (lambda a: ((a / "weights.data").unlink(), os.mkfifo(a / "weights.data")), "weights.data"),
    "options-edited": (lambda a: _edit_manifest(a, lambda d: d["options"].update(batch_size=2)), "prefill.onnx"),
    "fed-weight-without-file": (lambda a: _edit_manifest(a, lambda d: d.update(fed_weights={"w": {}})), "manifest.json"),
    "no-decode": (lambda a: _edit_manifest(a, lambda d: d.update(specializations=d["specializations"][:1])), "manifest.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_explicit_artifact_fails_in_one_line_naming_the_file(artifact: Path, tmp_path: Path, damage: str) -> None:
    # Items 1 and 3: every file is checked against the manifest's hashes when the artifact is opened.
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    Runtime(art)  # the copy opens before it is damaged
    do, name = DAMAGE[damage]
    do(art)
    with pytest.raises(ArtifactError) as info:
        Runtime(art)
    message = str(info.value)
    assert name in message and "\n" not in message, message
    assert "recompile" in message


@pytest.mark.parametrize(
    "damage", ["flipped-weights", "truncated-weights", "missing-graph", "zeroed-hashes", "truncated-manifest", "options-edited"]
)
def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(
    hf: tuple[Path, Any, list[int]], home: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    from qgraph import AutoModelForCausalLM

    folder, _, ref = hf
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    art = model.compile("cpu", **OPTS)
    assert model.generate(input_ids=[PROMPT], max_new_tokens=NEW).tokens[0] == ref
    do, name = DAMAGE[damage]
    do(art)
    again = AutoModelForCausalLM.from_pretrained(str(folder))
    with caplog.at_level(logging.WARNING):
        assert again.compile("cpu", **OPTS) == art
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any((name if damage != "options-edited" else "manifest.json") in w and "rebuil" in w for w in warned), warned
    assert again.generate(input_ids=[PROMPT], max_new_tokens=NEW).tokens[0] == ref
    Runtime(art)  # the rebuilt entry verifies


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_cached_export_is_rebuilt_with_a_warning(
    hf: tuple[Path, Any, list[int]], home: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    from qgraph import AutoModelForCausalLM

    folder, _, ref = hf
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.compile("cpu", **OPTS)
    onnx_path = model.onnx_path
    assert onnx_path is not None and onnx_path.is_relative_to(home / "exports")
    (_truncate if damage == "truncated" else _flip)(onnx_path)
    again = AutoModelForCausalLM.from_pretrained(str(folder))
    with caplog.at_level(logging.WARNING):
        again.compile("cpu", prefill_seq_len=4, ctx_len=32, batch_size=1)  # another artifact: the export is read
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("export" in w and "rebuil" in w for w in warned), warned
    assert again.onnx_path == onnx_path
    assert again.generate(input_ids=[PROMPT], max_new_tokens=NEW).tokens[0] == ref


def test_verification_is_recorded_and_any_change_is_still_seen(artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qgraph.artifact.verify as verify

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    hashed: list[str] = []
    real_hash = verify.sha256_file
    monkeypatch.setattr(verify, "sha256_file", lambda p: hashed.append(Path(p).name) or real_hash(p))
    # Files written this instant could change again within the file system's timestamp resolution: such a
    # verification is never recorded. Seen from a minute later, these files are old enough to record.
    real_now = verify.now_ns
    monkeypatch.setattr(verify, "now_ns", lambda: real_now() + 60 * 10**9)
    Runtime(art)
    assert sorted(hashed) == ["decode.onnx", "prefill.onnx", "weights.data"]
    hashed.clear()
    recorded = (art / verify.STAMP).stat().st_mtime_ns
    Runtime(art)
    assert hashed == [], "an unchanged artifact was hashed again"
    assert (art / verify.STAMP).stat().st_mtime_ns == recorded, "an unchanged record was written again"
    # A write that puts the old modification time back still changes the inode's change time.
    st = (art / "weights.data").stat()
    _flip(art / "weights.data")
    os.utime(art / "weights.data", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ArtifactError, match="weights.data"):
        Runtime(art)
    # A copy (new inodes) is hashed again, and opens.
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    hashed.clear()
    Runtime(copy)
    assert "weights.data" in hashed


def test_a_verification_of_files_just_written_is_not_recorded(artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qgraph.artifact.verify as verify

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    hashed: list[str] = []
    real_hash = verify.sha256_file
    monkeypatch.setattr(verify, "sha256_file", lambda p: hashed.append(Path(p).name) or real_hash(p))
    Runtime(art)
    Runtime(art)
    assert hashed.count("weights.data") == 2


def test_a_graph_pinned_to_other_shapes_is_refused_at_compile(tmp_path: Path) -> None:
    from helpers import OPTIMUM

    from qgraph.compile import CompileError, compile_model
    from qgraph.ir.graph import Graph
    from qgraph.pipeline.optimize import optimize

    g = Graph.load(OPTIMUM)
    optimize(g, ctx_len=32, batch_size=1, seq_len=8)  # every dim pinned: a prompt chunk of 8 tokens
    g.save(tmp_path / "pinned.onnx")
    with pytest.raises(CompileError, match="decode") as info:
        compile_model(tmp_path / "pinned.onnx", "cpu", tmp_path / "art", prefill_seq_len=8, ctx_len=32)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "art").exists()


# --------------------------------------------------------------------------- confinement (item 2)
def _outside_copy(artifact: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The artifact copied to tmp/a/art, and a working decode graph (with its weights) in tmp/outside."""
    art = tmp_path / "a" / "art"
    shutil.copytree(artifact, art)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("decode.onnx", "weights.data"):
        shutil.copy(artifact / name, outside / name)
    return art, outside


def _point_at(art: Path, field: str, where: str) -> None:
    """Name ``where`` in a manifest field, hashing it as it is (so only confinement can refuse it)."""
    target = (art / where) if not os.path.isabs(where) else Path(where)
    digest = _sha256(target)

    def edit(d: dict[str, Any]) -> None:
        spec = next(s for s in d["specializations"] if s["name"] == "decode")
        if field == "file":
            spec["file"] = where
        else:
            spec["extra_files"] = [where]
        d["hashes"][where] = digest

    _edit_manifest(art, edit)


@pytest.mark.parametrize("case", ["file-absolute", "file-dotdot", "extra-absolute", "extra-dotdot", "symlink-out", "hash-absolute"])
def test_files_named_by_the_manifest_stay_in_the_artifact_directory(artifact: Path, tmp_path: Path, case: str) -> None:
    art, outside = _outside_copy(artifact, tmp_path)
    if case == "file-absolute":
        _point_at(art, "file", str(outside / "decode.onnx"))
    elif case == "file-dotdot":
        _point_at(art, "file", "../../outside/decode.onnx")
    elif case == "extra-absolute":
        _point_at(art, "extra", str(outside / "weights.data"))
    elif case == "extra-dotdot":
        _point_at(art, "extra", "../../outside/weights.data")
    elif case == "symlink-out":
        (art / "decode.onnx").unlink()
        (art / "decode.onnx").symlink_to(outside / "decode.onnx")
    else:
        _edit_manifest(art, lambda d: d["hashes"].update({"/etc/hostname": "1" * 64}))
    with pytest.raises(ArtifactError, match="outside the artifact directory") as info:
        Runtime(art)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- read-only cache (item 4)
#: Runs the CLI with every write under QGRAPH_HOME refused as a read-only file system refuses it. The tree is
#: also made read-only with chmod; the hook makes that hold for root too, whom permissions do not stop.
_READ_ONLY_CLI = r"""
import errno, os, sys
home = os.path.realpath(os.environ["QGRAPH_HOME"])
WRITES = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.chmod", "os.chown", "os.utime", "os.truncate",
          "os.symlink", "os.link", "shutil.rmtree", "tempfile.mkstemp", "tempfile.mkdtemp"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def under_home(p):
    try:
        return isinstance(p, (str, bytes, os.PathLike)) and (os.path.realpath(os.fsdecode(p)) + "/").startswith(home + "/")
    except Exception:
        return False

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = bool((isinstance(mode, str) and set(mode) & set("wax+")) or (isinstance(flags, int) and flags & WRITE_FLAGS))
        if writing and under_home(path):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
    elif event in WRITES and args and under_home(args[0]):
        raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(args[0]))

sys.addaudithook(hook)
from qgraph.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _tree(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*"))


def test_a_complete_cache_on_a_read_only_file_system_is_used(hf: tuple[Path, Any, list[int]], home: Path) -> None:
    from qgraph import AutoModelForCausalLM

    folder, _, ref = hf
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.compile("cpu", **OPTS)
    assert model.generate(input_ids=[PROMPT], max_new_tokens=NEW).tokens[0] == ref
    before = _tree(home)
    modes = {p: p.lstat().st_mode for p in [home, *home.rglob("*")]}
    env = {**ENV, "QGRAPH_HOME": str(home)}

    def generate(prefill_seq_len: int) -> subprocess.CompletedProcess[str]:
        args = ["generate", "--model", str(folder), "--input-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW), "--json",
                "--prefill-seq-len", str(prefill_seq_len), "--ctx-len", str(OPTS["ctx_len"])]  # fmt: skip
        return subprocess.run([sys.executable, "-c", _READ_ONLY_CLI, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)

    try:
        for p in modes:
            p.chmod(stat.S_IMODE(modes[p]) & ~0o222)
        res = generate(OPTS["prefill_seq_len"])
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["tokens"] == [ref]
        # An entry the cache lacks cannot be made there: one line that says so.
        res = generate(4)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        errors = [line for line in res.stderr.splitlines() if not line.startswith("[qgraph]")]  # progress aside
        assert len(errors) == 1 and errors[0].startswith("qgraph generate: error:") and "QGRAPH_HOME" in errors[0], res.stderr
    finally:
        for p, mode in modes.items():
            p.chmod(stat.S_IMODE(mode))
    assert _tree(home) == before


# --------------------------------------------------------------------------- versions in the key (item 5)
@pytest.mark.parametrize("package", ["onnxruntime", "onnxruntime-qnn", "torch", "transformers"])
def test_the_cache_key_changes_with_the_libraries_versions(
    hf: tuple[Path, Any, list[int]], home: Path, monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    import importlib.metadata as metadata

    from qgraph import AutoModelForCausalLM

    folder = hf[0]
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    art = model.compile("cpu", **OPTS)
    export = model.onnx_path
    real = metadata.version

    def upgraded(name: str) -> str:
        return "999.0" if name == package else real(name)

    monkeypatch.setattr(metadata, "version", upgraded)
    after = AutoModelForCausalLM.from_pretrained(str(folder))
    assert after.compile("cpu", **OPTS) != art
    if package in ("torch", "transformers"):  # they make the export
        assert after.onnx_path != export
