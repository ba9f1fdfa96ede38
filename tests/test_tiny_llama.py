"""The bundled ``tiny-llama`` (issue 18): a Llama of grouped KV heads, at most 8 MB, shipped with the package,
that qgraph runs token for token as Hugging Face does and that continues "Hi there!!" in English offline."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import pytest
from helpers import ENV, ROOT, assert_logits_match_hf, cli_command, generate_recording_logits, hf_greedy, load_tool

from qgraph import AutoModelForCausalLM
from qgraph.frontend.hf import BUNDLED_DIR, BUNDLED_MODELS, load_model, load_tokenizer
from qgraph.targets import qnn

pytest.importorskip("torch")

FOLDER = BUNDLED_DIR / "tiny-llama"
#: Rows of different lengths at batch 2: one padded, one longer than the prefill chunk of 8.
TEXTS = ["Hi there!!", "Good morning! My name is Anna. How are you today?"]
pytestmark = pytest.mark.skipif(not (FOLDER / "config.json").is_file(), reason="the bundled tiny-llama is missing")


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One QGRAPH_HOME for this module's runs: the model is exported once (the CLI reuses the API's export)."""
    home = tmp_path_factory.mktemp("tiny-llama-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QGRAPH_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield home


def _corpus_words() -> set[str]:
    """Every word of the training corpus's generator (tools/tiny_corpus.py), lower-cased."""
    lines = load_tool("tiny_corpus").generate_corpus(30000, seed=0)
    return {w for line in lines for w in re.findall(r"[a-z]+", line.lower())}


def test_tiny_llama_is_a_small_grouped_kv_llama_in_the_package_data() -> None:
    assert "tiny-llama" in BUNDLED_MODELS
    assert (FOLDER / "model.safetensors").stat().st_size <= 8_000_000
    config = json.loads((FOLDER / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped KV heads
    assert config["hidden_act"] == "silu"  # SwiGLU: silu(gate) * up
    assert (FOLDER / "tokenizer.json").is_file() and (FOLDER / "README.md").is_file()
    # Every file of every bundled model is package data, so a wheel carries the models.
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    patterns = json.loads(re.search(r"^qgraph = (\[.*\])$", section, re.M)[1])  # type: ignore[index]
    for name in BUNDLED_MODELS:
        for f in (BUNDLED_DIR / name).iterdir():
            rel = f.relative_to(BUNDLED_DIR.parent).as_posix()
            assert any(fnmatch(rel, p) for p in patterns), f"{rel} is not in pyproject's package data"


def test_tiny_llama_generates_hugging_faces_greedy_tokens(tiny_home: Path) -> None:
    """Two rows of different lengths (one padded, one longer than the prefill chunk of 8), greedy, on cpu: Hugging
    Face's tokens, and its logits within 1e-3 at every step."""
    tok = load_tokenizer("tiny-llama")
    hf = load_model("tiny-llama")
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    assert prompts[0][0] == tok.bos_token_id and len(prompts[1]) > 8
    n = 20
    want = [hf_greedy(hf, p, n, distinct=6) for p in prompts]

    model = AutoModelForCausalLM.from_pretrained("tiny-llama")
    model.compile("cpu", prefill_seq_len=8, ctx_len=64, batch_size=2)
    out = model.generate(TEXTS, max_new_tokens=n)
    assert out.tokens == want
    steps, logits = generate_recording_logits(model.runtime, prompts, n, eos_token_id=model.spec.eos_token_ids)
    assert steps.tokens == want
    assert_logits_match_hf(hf, prompts, steps.tokens, logits, atol=1e-3)
    words = _corpus_words()
    for text in out.text or []:
        found = re.findall(r"[a-z]+", text.lower())
        assert len(found) >= 5 and set(found) <= words, text  # English: the corpus's words


def test_qgraph_generate_hi_there_with_tiny_llama_prints_english(tiny_home: Path) -> None:
    """The issue's command, offline: the prompt, then the continuation Hugging Face's greedy decoding gives."""
    n = 16
    res = subprocess.run(cli_command("generate", "Hi there!!", "--model", "tiny-llama", "--max-new-tokens", str(n)),
                         capture_output=True, text=True, env={**ENV, "QGRAPH_HOME": str(tiny_home)}, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr
    tok = load_tokenizer("tiny-llama")
    want = hf_greedy(load_model("tiny-llama"), tok("Hi there!!")["input_ids"], n)
    first = res.stdout.splitlines()[0]
    assert first == "Hi there!!" + tok.decode(want, skip_special_tokens=True), res.stdout
    found = re.findall(r"[a-z]+", first.lower())
    assert len(found) >= 6 and set(found) <= _corpus_words(), first


def test_a_graph_quantized_by_optimize_compiles_as_compile_quantizes(tiny_home: Path, tmp_path: Path) -> None:
    """``qgraph optimize --quantize int8``, then ``qgraph compile`` of its output: compile pins the shapes through the
    quantized contrib ops (it could not: their outputs kept no shape) and runs the same numbers as ``compile
    --quantize int8`` of the export (the blocks are per column, so packing q/k/v or not changes nothing)."""
    from qgraph.cli import main
    from qgraph.runtime import Runtime

    model = AutoModelForCausalLM.from_pretrained("tiny-llama")
    model.compile("cpu", prefill_seq_len=8, ctx_len=64, quantize="int8")
    prompts = [load_tokenizer("tiny-llama")(t)["input_ids"] for t in TEXTS]
    want = model.generate(input_ids=prompts, max_new_tokens=16).tokens
    q, art = tmp_path / "q.onnx", tmp_path / "art"
    assert main(["optimize", str(model.onnx_path), "-o", str(q), "--ctx-len", "64", "--quantize", "int8"]) == 0
    assert main(["compile", str(q), "--target", "cpu", "-o", str(art), "--prefill-seq-len", "8", "--ctx-len", "64"]) == 0
    assert Runtime(art).generate(prompts, max_new_tokens=16).tokens == want


@pytest.mark.skipif(not qnn.qnn_available(), reason="onnxruntime-qnn is not installed (pip install 'qgraph[qnn]')")
def test_tiny_llama_gives_hugging_faces_tokens_on_qnn(tiny_home: Path) -> None:
    """The HTP simulator with every node on QNN (the target refuses CPU fallback): Hugging Face's greedy tokens."""
    tok = load_tokenizer("tiny-llama")
    hf = load_model("tiny-llama")
    n = 8
    model = AutoModelForCausalLM.from_pretrained("tiny-llama")
    model.compile("qnn", prefill_seq_len=8, ctx_len=64, batch_size=2)
    assert model.generate(TEXTS, max_new_tokens=n).tokens == [hf_greedy(hf, tok(t)["input_ids"], n, distinct=4) for t in TEXTS]
