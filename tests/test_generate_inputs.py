"""What generate() takes from the user and the model folder: token ids checked before the compile,
a missing tokenizer named, and the EOS ids of generation_config.json honoured as Hugging Face honours them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import random_gpt2

from qgraph import AutoModelForCausalLM
from qgraph.errors import GenerationError, ModelSourceError

torch = pytest.importorskip("torch")

SHAPE: dict[str, Any] = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=48)
BUNDLED = Path(__file__).parent.parent / "qgraph" / "models" / "tiny-gpt2"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QGRAPH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "home"


def test_token_ids_are_checked_before_the_compile(tmp_path: Path, home: Path) -> None:
    folder = tmp_path / "model"
    random_gpt2(folder, **SHAPE)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    # A float id used to be truncated (1.5 -> 1) silently; an id outside the vocabulary was refused only after the compile.
    with pytest.raises(GenerationError, match=r"prompt 0 has a token id that is not an integer: 1.5; token ids are integers"):
        model.generate(input_ids=[[1.5, 2]])
    with pytest.raises(GenerationError, match="prompt 1 has a token id that is not an integer"):
        model.generate(input_ids=[[1, 2], np.array([3.0, 4.0])])
    with pytest.raises(GenerationError, match=r"prompt 0 has token ids outside the vocabulary \(0..100\): \[101, -1\]"):
        model.generate(input_ids=[[5, 101, -1]])
    with pytest.raises(GenerationError, match="temperature must be >= 0 and finite"):
        model.generate(input_ids=[[5, 6]], temperature=float("nan"))
    assert not home.exists(), "a bad argument got as far as the export"
    # Integers of any kind are ids: numpy's and torch's too, with the same tokens as Python ints.
    want = model.generate(input_ids=[[5, 6, 7]], max_new_tokens=3).tokens
    assert model.generate(input_ids=np.array([[5, 6, 7]], np.int64), max_new_tokens=3).tokens == want
    assert model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3).tokens == want
    with pytest.raises(GenerationError, match="not an integer: 2.5"):
        model.runtime.generate([[1, 2.5]], max_new_tokens=2)


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="the bundled model is missing")
def test_a_folder_without_a_tokenizer_says_so(tmp_path: Path, home: Path) -> None:
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(BUNDLED / name, folder / name)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    # It used to say "prompt 0 is empty": the tokenizer transformers made from nothing has no vocabulary.
    with pytest.raises(ModelSourceError, match="has no tokenizer") as err:
        model.generate(["Hi there"])
    assert "input_ids" in str(err.value) and "tokenizer.json" in str(err.value)
    # A Llama's config names a tokenizer class that transformers 5 cannot make from nothing: its own error said
    # "Couldn't instantiate the backend tokenizer from one of: " (an empty list).
    from qgraph.frontend.families import FAMILIES

    llama = FAMILIES["llama"].save_random(dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               intermediate_size=32, vocab_size=64), tmp_path / "llama", seed=0)  # fmt: skip
    with pytest.raises(ModelSourceError, match="has no tokenizer .*--input-ids"):
        AutoModelForCausalLM.from_pretrained(str(llama)).generate(["Hi there"])
    assert not home.exists()


def _hf_generate(folder: Path, prompt: list[int], n: int) -> list[int]:
    """Hugging Face's greedy generate on the saved folder: its generation_config.json decides where it stops."""
    from transformers import AutoModelForCausalLM as HFModel

    hf = HFModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_eos_of_generation_config_stops_where_hugging_face_stops(tmp_path: Path, home: Path) -> None:
    prompt, n = [5, 17, 42, 8], 12
    folder = tmp_path / "model"
    # initializer_range 0.3: greedy output that varies, so an EOS in the middle of it can be chosen.
    config, _ = random_gpt2(folder, **SHAPE, initializer_range=0.3, seed=7)
    free = _hf_generate(folder, prompt, n)
    assert len(set(free)) >= 6 and config.eos_token_id not in free, free
    k = next(i for i in range(3, n) if free[i] not in free[:i])  # a token greedy reaches first at step k
    gen_config = json.loads((folder / "generation_config.json").read_text())

    # generation_config.json alone names the EOS ids, a list of them: HF stops at the first one reached, at step k.
    (folder / "generation_config.json").write_text(json.dumps({**gen_config, "eos_token_id": [free[k], SHAPE["vocab_size"] - 2]}))
    want = _hf_generate(folder, prompt, n)
    assert want == free[: k + 1]
    out = AutoModelForCausalLM.from_pretrained(str(folder)).generate(input_ids=[prompt], max_new_tokens=n)
    assert out.tokens == [want] and out.finish_reasons == ["eos"]

    # A generation_config.json without eos_token_id: HF does not stop at the config's EOS (reached at step k here); neither does qgraph.
    (folder / "generation_config.json").write_text(json.dumps({k_: v for k_, v in gen_config.items() if k_ != "eos_token_id"}))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "eos_token_id": free[k]}))
    want = _hf_generate(folder, prompt, n)
    assert want == free
    out = AutoModelForCausalLM.from_pretrained(str(folder)).generate(input_ids=[prompt], max_new_tokens=n)
    assert out.tokens == [want] and out.finish_reasons == ["length"]

    # No generation_config.json: the config's EOS, as HF does.
    (folder / "generation_config.json").unlink()
    want = _hf_generate(folder, prompt, n)
    assert want == free[: k + 1]
    out = AutoModelForCausalLM.from_pretrained(str(folder)).generate(input_ids=[prompt], max_new_tokens=n)
    assert out.tokens == [want] and out.finish_reasons == ["eos"]
