"""Robustness: nothing executes on load.

A model folder's custom code never runs, pickle weights are refused, and the
sources hold no pickle, eval/exec, unsafe loaders or ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ENV, ROOT, cli_command, run_all

from qgraph.errors import ModelSourceError

_EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("code from the model folder ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""


def _evil_folder(folder: Path, marker: Path, model_type: str = "evil") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_evil.py").write_text(_EVIL_CODE.format(marker=str(marker)))
    (folder / "modeling_evil.py").write_text(_EVIL_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilModel"})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_in_a_model_folder_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    folder = _evil_folder(tmp_path / "evil", marker)
    results = run_all([cli_command("generate", "--model", str(folder), "--input-ids", "1,2"),
                        cli_command("export", str(folder), "-o", str(tmp_path / "out.onnx"))], env={**ENV, "QGRAPH_HOME": str(tmp_path / "h")})  # fmt: skip
    for res, command in zip(results, ("generate", "export")):
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert last.startswith(f"qgraph {command}: error: ") and "evil" in last, last
    assert not marker.exists(), "code from the model folder ran"
    assert not (tmp_path / "out.onnx").exists()


def test_a_gpt2_folder_with_auto_map_loads_without_its_code(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from helpers import random_gpt2

    from qgraph.frontend.hf import load_model

    marker = tmp_path / "MARKER"
    folder = tmp_path / "gpt2"
    random_gpt2(folder, n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=32)
    _evil_folder(folder, marker, model_type="gpt2")
    model = load_model(str(folder))
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not marker.exists(), "code from the model folder ran"


def test_pickle_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from helpers import random_gpt2
    from safetensors.torch import load_file

    from qgraph.frontend.hf import load_model

    folder = tmp_path / "bin"
    random_gpt2(folder, n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=32)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    calls: list[object] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(ModelSourceError, match="no safetensors weights"):
        load_model(str(folder))
    assert not calls, "a pickle was loaded"


def test_no_code_runs_on_load_in_the_sources() -> None:
    # No pickle (or its relatives), eval/exec, torch.load, unsafe YAML, or trust_remote_code=True in the package and the passes.
    import ast

    banned_modules = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib"}
    banned_calls = {"eval", "exec", "torch.load", "yaml.load", "yaml.unsafe_load", "numpy.load", "np.load"}
    found = []
    for pkg in ("qgraph", "passes"):
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                where = f"{f.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                    found += [f"{where}: import {n}" for n in names if n.split(".")[0] in banned_modules]
                elif isinstance(node, ast.Call):
                    name = ast.unparse(node.func)
                    if name in banned_calls:
                        found.append(f"{where}: {name}()")
                    found += [f"{where}: trust_remote_code=True" for k in node.keywords
                              if k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is True]  # fmt: skip
    assert not found, found
