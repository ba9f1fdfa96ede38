"""Mistral (``MistralForCausalLM``): its sliding window, the raw export and the cpu pipeline.

qgraph's cache keeps every position, so a sliding-window model runs only while
ctx_len is within the window (attention there is full); a longer ctx_len is
refused in one line before anything is exported. The export builds a full cache
for every layer (Mistral's window layers made torch.export fail), which within
the window is the model's own computation: the raw export matches Hugging Face, and
the cpu target generates its tokens, teacher-forced logits within 1e-3, up to ctx_len = window.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import ENV, cli_command, generate_recording_logits, hf_greedy, hf_logits_along, ort_run

from qgraph.compile import compile_model
from qgraph.errors import OptionError
from qgraph.frontend.export import export_model, io_names
from qgraph.frontend.families import FAMILIES
from qgraph.frontend.families.decoder import RANDOM_INIT_RANGE
from qgraph.runtime import Runtime

WINDOW = 16
SHAPE = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             vocab_size=211, max_position_embeddings=64, sliding_window=WINDOW, initializer_range=RANDOM_INIT_RANGE)  # fmt: skip


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return FAMILIES["mistral"].save_random(SHAPE, tmp_path_factory.mktemp("mistral") / "hf", seed=3)


def _hf(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module", params=["dynamo", "torchscript"])
def exported(request: pytest.FixtureRequest, mistral: Path) -> Any:
    return export_model(str(mistral), mistral.parent / f"{request.param}.onnx", exporter=request.param)


def test_the_raw_export_matches_hugging_face_within_the_window(mistral: Path, exported: Any) -> None:
    result = exported
    assert result.spec.sliding_window == WINDOW and result.spec.max_positions == WINDOW
    model = _hf(mistral)
    inputs, outputs = io_names(2)
    rng = np.random.default_rng(0)
    seq = WINDOW - 1  # prefill, then one decode step at the window's last position
    ids = rng.integers(0, SHAPE["vocab_size"], (1, seq + 1), dtype=np.int64)
    empty = np.zeros((1, 2, 0, 12), np.float32)
    pos = np.arange(seq, dtype=np.int64)[None]
    got = ort_run(result.path, {"input_ids": ids[:, :seq], "attention_mask": np.ones((1, seq), np.int64), "position_ids": pos,
                                **{n: empty for n in inputs[3:]}})  # fmt: skip
    feeds = {"input_ids": ids[:, seq:], "attention_mask": np.ones((1, seq + 1), np.int64), "position_ids": np.array([[seq]])}
    feeds.update({i: got[o] for i, o in zip(inputs[3:], outputs[1:], strict=True)})
    step = ort_run(result.path, feeds)["logits"]
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got["logits"], want[:, :seq], atol=1e-4)
    np.testing.assert_allclose(step, want[:, seq:], atol=1e-4)


def test_cpu_generates_hugging_faces_tokens_and_logits_over_the_whole_window(mistral: Path, exported: Any, tmp_path: Path) -> None:
    """ctx_len = the window, two padded prompts (one longer than the prefill chunk) generated to its end."""
    art = compile_model(exported.path, "cpu", tmp_path / "art", prefill_seq_len=4, ctx_len=WINDOW, batch_size=2)
    prompts = [[5, 17, 42], [7, 1, 2, 3, 4, 5, 6]]
    new = WINDOW - len(prompts[1]) - 1
    out, logits = generate_recording_logits(Runtime(art), prompts, new)
    model = _hf(mistral)
    for prompt, tokens, got in zip(prompts, out.tokens, logits, strict=True):
        assert tokens == hf_greedy(model, prompt, new, distinct=4)
        np.testing.assert_allclose(np.stack(got), hf_logits_along(model, prompt, tokens), atol=1e-3)


def test_a_ctx_len_past_the_window_is_refused_in_one_line(mistral: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    res = subprocess.run(cli_command("generate", "--model", str(mistral), "--input-ids", "1,2,3", "--ctx-len", str(2 * WINDOW)),
                         capture_output=True, text=True, env={**ENV, "QGRAPH_HOME": str(home)}, timeout=120)  # fmt: skip
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert f"sliding attention window {WINDOW}" in lines[0] and f"--ctx-len {WINDOW} or less" in lines[0], lines[0]
    assert not home.exists(), "the refused ctx_len got as far as the export"


def test_compiling_the_export_past_the_window_says_why(exported: Any, tmp_path: Path) -> None:
    """The raw file alone (no config at hand): the export recorded the window and its reason."""
    with pytest.raises(OptionError, match=f"ctx_len {2 * WINDOW} is longer than the model's sliding attention window {WINDOW}: ") as e:
        compile_model(exported.path, "cpu", tmp_path / "art", prefill_seq_len=4, ctx_len=2 * WINDOW)
    assert "\n" not in str(e.value) and str(e.value).endswith(f"use --ctx-len {WINDOW} or less")
