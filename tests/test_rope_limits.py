"""Rotary scalings whose angles depend on the sequence's own length: qgraph compiles one table, so it takes them
only where that table is Hugging Face's, and refuses a longer context instead of generating other tokens.

* Phi-3's ``longrope``: short factors while the sequence is within ``original_max_position_embeddings``, long
  factors for every position once it passes it. Exact up to the switch; a ctx_len past it is refused (the
  family's ``rope_limit`` caps ``max_positions``, and ``qgraph export`` records that cap for compiles of the file).
* ``dynamic`` NTK scaling: the base frequencies until the sequence passes ``max_position_embeddings``, which caps
  the context already. torch.export cannot trace its length check; the TorchScript export can, and is exact; it is such a
  model's default exporter (``ModelSpec.exporter``), so ``qgraph generate`` takes it as it is.
* ``yarn`` (static: one table, scaled, whatever the length) is exact past its ``original_max_position_embeddings``.

The configs are tiny random models with varied greedy output (initializer_range 0.3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import hf_greedy

from qgraph.api import AutoModelForCausalLM as QModel
from qgraph.compile import compile_model
from qgraph.errors import OptionError
from qgraph.frontend.export import export_model
from qgraph.frontend.families import FAMILIES
from qgraph.frontend.families.decoder import RANDOM_INIT_RANGE
from qgraph.ir.contract import MAX_POSITIONS_KEY
from qgraph.ir.graph import Graph
from qgraph.runtime import Runtime

pytest.importorskip("torch")

SWITCH = 16
BASE: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=211, num_attention_heads=4,
                            initializer_range=RANDOM_INIT_RANGE)  # fmt: skip
LONGROPE = dict(num_key_value_heads=4, pad_token_id=0, max_position_embeddings=128, original_max_position_embeddings=SWITCH,
                rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                              "long_factor": [2.0 + 0.2 * i for i in range(8)]})  # fmt: skip
YARN = dict(
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": SWITCH},
)
DYNAMIC = dict(num_key_value_heads=2, max_position_embeddings=SWITCH, rope_scaling={"rope_type": "dynamic", "factor": 2.0})


def _hf(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _generate(raw: Path, out: Path, ctx_len: int | None, prompt: list[int], n: int) -> list[int]:
    art = compile_model(raw, "cpu", out, prefill_seq_len=4, ctx_len=ctx_len, batch_size=1)
    return list(Runtime(art).generate([prompt], max_new_tokens=n).tokens[0])


@pytest.fixture(scope="module")
def longrope(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the Phi-3 folder, its dynamo export)."""
    folder = FAMILIES["phi3"].save_random({**BASE, **LONGROPE}, tmp_path_factory.mktemp("longrope"), seed=1)
    return folder, export_model(str(folder), folder / "raw.onnx").path


def test_longrope_is_hugging_face_up_to_its_switch(longrope: tuple[Path, Path], tmp_path: Path) -> None:
    folder, raw = longrope
    spec = QModel(str(folder)).spec
    assert (spec.rope_limit, spec.max_positions) == (SWITCH, SWITCH)
    assert Graph.load(raw).metadata[MAX_POSITIONS_KEY] == str(SWITCH)
    prompt = [7, 1, 2, 3, 4, 5, 6]
    new = SWITCH - len(prompt)
    # No ctx_len given: the recorded cap is the default (it was 128, past the switch, before).
    assert _generate(raw, tmp_path / "art", None, prompt, new) == hf_greedy(_hf(folder), prompt, new, distinct=4)


def test_a_ctx_len_past_the_longrope_switch_is_refused(longrope: tuple[Path, Path], tmp_path: Path) -> None:
    folder, raw = longrope
    with pytest.raises(OptionError, match=f"longer than {SWITCH}, where the model's longrope rotary switches.*--ctx-len {SWITCH} or less"):
        QModel(str(folder)).options("cpu", ctx_len=2 * SWITCH)
    # Compiling the exported file alone: the export's recorded cap refuses it too, with the same reason.
    with pytest.raises(OptionError, match=f"longer than {SWITCH}, where the model's longrope rotary switches.*--ctx-len {SWITCH} or less"):
        compile_model(raw, "cpu", tmp_path / "art", prefill_seq_len=4, ctx_len=2 * SWITCH, batch_size=1)


def test_dynamic_ntk_through_torchscript_is_hugging_face_within_max_positions(tmp_path: Path) -> None:
    folder = FAMILIES["llama"].save_random({**BASE, **DYNAMIC}, tmp_path / "hf", seed=1)
    assert QModel(str(folder)).spec.exporter == "torchscript"
    result = export_model(str(folder), folder / "raw.onnx")  # no exporter named: the model's
    assert result.exporter == "torchscript"
    raw = result.path
    prompt = [5, 17, 42, 9, 9, 1]
    new = SWITCH - len(prompt)
    assert _generate(raw, tmp_path / "art", None, prompt, new) == hf_greedy(_hf(folder), prompt, new, distinct=4)
    # The API (qgraph generate's path) exports it the same way; dynamo would fail on the length check.
    assert QModel(str(folder)).export(out=tmp_path / "api.onnx").is_file()


def test_yarn_is_hugging_face_past_its_original_length(tmp_path: Path) -> None:
    folder = FAMILIES["llama"].save_random({**BASE, **YARN}, tmp_path / "hf", seed=1)
    assert QModel(str(folder)).spec.rope_limit is None
    raw = export_model(str(folder), folder / "raw.onnx").path
    prompt = [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # past the original 16 already
    assert _generate(raw, tmp_path / "art", 40, prompt, 20) == hf_greedy(_hf(folder), prompt, 20, distinct=4)
