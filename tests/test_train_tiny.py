"""tools/train_tiny.py, the one trainer of the bundled models, on a few steps of a tiny shape: each family's
folder loads with transformers, its tokenizer frames text as the family does, and the README tells the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV, ROOT, TOOLS

pytest.importorskip("torch")

SHAPE = ["--steps", "2", "--corpus-lines", "300", "--vocab-size", "300", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
         "--n-positions", "64", "--block-size", "32", "--batch-size", "2", "--sample-tokens", "3", "--log-every", "1"]  # fmt: skip


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_train_tiny_writes_a_folder_that_transformers_loads(family: str, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / f"tiny-{family}"
    args = ["--family", family, "--out", str(out), *SHAPE, *(["--n-kv-head", "1"] if family == "llama" else [])]
    res = subprocess.run(
        [sys.executable, str(TOOLS / "train_tiny.py"), *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "README.md"}
    config = AutoConfig.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Hi there!!")["input_ids"]
    if family == "llama":
        assert config.architectures == ["LlamaForCausalLM"] and config.num_key_value_heads < config.num_attention_heads
        assert ids[0] == tok.bos_token_id == config.bos_token_id and tok.eos_token_id == config.eos_token_id != tok.bos_token_id
    else:
        assert config.architectures == ["GPT2LMHeadModel"] and tok.bos_token_id == tok.eos_token_id == config.eos_token_id
        assert tok.bos_token_id not in ids  # GPT-2 separates passages with <|endoftext|> but adds none to a prompt
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == config.eos_token_id
    readme = (out / "README.md").read_text()
    assert f"python tools/train_tiny.py {' '.join(args)}" in readme and f"# tiny-{family}" in readme
