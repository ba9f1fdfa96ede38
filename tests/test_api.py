"""The high-level API: export/compile/generate, and the QGRAPH_HOME cache keys.

Tokens are compared with Hugging Face's greedy ones on random GPT-2s with initializer_range 0.3, whose
greedy output varies (the default 0.02 repeats one token and hides a cache bug).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from helpers import hf_greedy, random_gpt2

import qgraph.api as api
from qgraph import AutoModelForCausalLM
from qgraph.errors import OptionError

torch = pytest.importorskip("torch")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QGRAPH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_seed_style_flow_and_cache(tmp_path: Path, home: Path) -> None:
    folder = tmp_path / "model"
    _, hf = random_gpt2(folder, n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=48, seed=1, initializer_range=0.3)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    art = model.compile(target="cpu", prefill_seq_len=8, ctx_len=32, batch_size=1)
    assert art.parent == home / "artifacts" and (art / "manifest.json").is_file()
    out = model.generate(input_ids=[[3, 4, 5, 6]], max_new_tokens=6)
    assert out.tokens[0] == hf_greedy(hf, [3, 4, 5, 6], 6, distinct=4)
    assert out.stats.decode_tokens_per_s > 0 and out.text is None

    # Same model, same options: the artifact is reused.
    again = AutoModelForCausalLM.from_pretrained(str(folder))
    assert again.compile(target="cpu", prefill_seq_len=8, ctx_len=32, batch_size=1) == art
    # Other options: another artifact.
    assert again.compile(target="cpu", prefill_seq_len=4, ctx_len=32, batch_size=1) != art

    # A changed weight never reuses the stale export or artifact.
    with torch.no_grad():
        hf.transformer.h[0].mlp.c_fc.weight.add_(0.5)
    hf.save_pretrained(folder)
    changed = AutoModelForCausalLM.from_pretrained(str(folder))
    art2 = changed.compile(target="cpu", prefill_seq_len=8, ctx_len=32, batch_size=1)
    assert art2 != art and changed.onnx_path != model.onnx_path
    assert changed.generate(input_ids=[[3, 4, 5, 6]], max_new_tokens=6).tokens[0] == hf_greedy(hf, [3, 4, 5, 6], 6, distinct=3)


def test_a_changed_pass_changes_the_key(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    random_gpt2(folder, n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=48)
    a = AutoModelForCausalLM.from_pretrained(str(folder)).compile(target="cpu", prefill_seq_len=8, ctx_len=32)
    monkeypatch.setattr(api, "code_digest", lambda: "a-different-pass")
    b = AutoModelForCausalLM.from_pretrained(str(folder)).compile(target="cpu", prefill_seq_len=8, ctx_len=32)
    assert a != b


def test_artifacts_dir_and_errors(tmp_path: Path, home: Path) -> None:
    from qgraph.errors import QGraphError

    folder = tmp_path / "model"
    random_gpt2(folder, n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=48)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    with pytest.raises(QGraphError, match="larger than the model's maximum length 48"):
        model.compile(ctx_len=64)
    with pytest.raises(QGraphError, match="larger than ctx_len"):
        model.compile(ctx_len=16, prefill_seq_len=32)
    out = model.compile(prefill_seq_len=8, ctx_len=32, artifacts=tmp_path / "mine")
    assert out == tmp_path / "mine" and (out / "manifest.json").is_file()
    with pytest.raises(QGraphError, match="either prompts"):
        model.generate()


def test_options_are_resolved_against_the_config_before_anything_slow(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qgraph.errors import PassOrderError
    from qgraph.targets.cpu import CpuTarget

    folder = tmp_path / "model"
    random_gpt2(folder, n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=48)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    opts = model.options()  # the config's 48 positions cap the default ctx_len
    assert (opts.ctx_len, opts.prefill_seq_len, opts.batch_size) == (48, 32, 1)
    assert opts.target_options == CpuTarget.defaults
    assert model.options(ctx_len=16).prefill_seq_len == 16
    with pytest.raises(TypeError, match="not both"):
        model.compile(options=opts, ctx_len=16)
    # Options made by hand are held to the model's positions too.
    with pytest.raises(OptionError, match="ctx_len 64 is larger than the model's maximum length 48; use --ctx-len 48 or less"):
        model.compile(options=replace(opts, ctx_len=64))
    # The order of every pass of the compile is checked before the export.
    monkeypatch.setattr(CpuTarget, "slots", {"legalize": ("fuse-decode-attention", "fuse-attention")})
    with pytest.raises(PassOrderError, match="'fuse-decode-attention' requires 'attention_fused'"):
        model.compile(options=opts)
    assert not home.exists()


@pytest.mark.parametrize("target", ["cpu", "qnn"])
def test_a_dry_run_is_refused_where_the_target_compiles_here(tmp_path: Path, home: Path, target: str) -> None:
    from qgraph.compile import compile_model
    from qgraph.targets import TargetError

    model = AutoModelForCausalLM.from_pretrained("tiny-gpt2")
    with pytest.raises(TargetError, match=f"--target {target} compiles here, so drop --dry-run"):
        model.compile(target, dry_run=True)
    assert not home.exists()  # refused before the export
    with pytest.raises(TargetError, match="drop --dry-run"):
        compile_model(tmp_path / "never-read.onnx", target, tmp_path / "out", dry_run=True)
