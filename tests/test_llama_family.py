"""Llama-family decoders (Llama, Qwen2, Phi-3, Gemma) through the default pipeline and the cpu target, against
Hugging Face: greedy tokens, single and batched (a padded row, a prompt longer than the prefill chunk), and the
logits each token was chosen from, teacher-forced, at every step.

The configs are tiny random models (initializer_range 0.3, so greedy output varies) that between them cover
GQA ratios 1, 2 and 4, a head_dim other than hidden / heads, Llama's linear and llama3 rope scaling, Qwen2's
q/k/v biases, Phi-3's packed projections, Gemma's 1 + weight RMSNorm and GeGLU, tied and untied embeddings.
ORT CPU and PyTorch both compute in float32; ATOL = 1e-3 (the issue's tolerance) is far above the float32
noise of these models and far below what a wrong cache slot, position or rotary angle changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from helpers import generate_recording_logits, hf_greedy, hf_logits_along

from qgraph.compile import compile_model
from qgraph.frontend.families import FAMILIES, spec_of
from qgraph.frontend.families.decoder import RANDOM_INIT_RANGE
from qgraph.ir.graph import Graph
from qgraph.pipeline.optimize import optimize
from qgraph.runtime import Runtime

torch = pytest.importorskip("torch")

ATOL = 1e-3
PREFILL = 4
CTX = 40
NEW = 10
PROMPTS = [[5, 17, 42], [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [100, 3, 9, 9, 1]]  # one longer than two chunks
BASE: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=211, max_position_embeddings=128,
    initializer_range=RANDOM_INIT_RANGE,
)  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
#: id -> (family, config fields beyond BASE). Between them: GQA ratios 1, 2, 4; head_dim != hidden / heads; rope scaling; tied/untied.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa2-linear": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-gqa4-llama3-head_dim": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=10, tie_word_embeddings=True,
                                                 rope_scaling=LLAMA3)),
    # use_sliding_window with every layer below max_window_layers: no layer slides, so ctx_len 40 > the window runs
    "qwen2-gqa4-tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                      use_sliding_window=True, sliding_window=16, max_window_layers=2)),
    "phi3-mha-untied": ("phi3", dict(num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, tie_word_embeddings=False)),
    "gemma-gqa2-head_dim": ("gemma", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    """(config id, the Hugging Face model, its raw dynamo export)."""
    from transformers import AutoModelForCausalLM

    from qgraph.frontend.export import export_model

    family, fields = CONFIGS[request.param]
    folder = FAMILIES[family].save_random({**BASE, **fields}, tmp_path_factory.mktemp(request.param), seed=1)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    return request.param, hf, export_model(hf, folder / "raw.onnx").path


def test_default_pipeline_counts(model: tuple[str, Any, Path]) -> None:
    """One RMSNormalization per norm (2 per layer and the final one), computed in fp32; no attention_mask input."""
    name, hf, path = model
    graph = Graph.load(path)
    optimize(graph, ctx_len=CTX)
    layers = hf.config.num_hidden_layers
    ops = graph.op_counts()
    assert ops["RMSNormalization"] == 2 * layers + 1, (name, dict(ops))
    assert "attention_mask" not in [t.name for t in graph.inputs]
    kv = hf.config.num_key_value_heads
    head_dim = getattr(hf.config, "head_dim", None) or hf.config.hidden_size // hf.config.num_attention_heads
    for t in graph.inputs[2:]:
        assert list(t.shape) == ["batch", kv, CTX, head_dim], t.name


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_matches_hf_tokens_and_logits_at_every_step(model: tuple[str, Any, Path], batch: int, tmp_path: Path) -> None:
    """Batch 1: each prompt alone, its chunks through GroupQueryAttention (head sizes that are multiples of 8);
    batch 2: three prompts, a padded row and a second group after a reset."""
    name, hf, path = model
    art = compile_model(path, "cpu", tmp_path / "cpu", prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=batch)
    spec = spec_of(hf.config)
    for graph in ("prefill", "decode"):
        ops = [n.op_type for n in onnx.load(str(art / f"{graph}.onnx"), load_external_data=False).graph.node]
        # GroupQueryAttention's CPU kernel takes head sizes that are multiples of 8 and a chunk in one row only
        fused = spec.head_dim % 8 == 0 and (graph == "decode" or batch == 1)
        assert ops.count("GroupQueryAttention" if fused else "MultiHeadAttention") == spec.num_layers, (name, graph, ops)
        # q and k rotate inside GroupQueryAttention (do_rotary; its CPU kernel wants head sizes that are multiples of
        # 16), elsewhere one RotaryEmbedding per attention input.
        inside = fused and spec.head_dim % 16 == 0
        assert ops.count("RotaryEmbedding") == (0 if inside else 2 * spec.num_layers), (name, graph, ops)
    rt = Runtime(art)
    prompts = PROMPTS if batch > 1 else PROMPTS[:2]
    out, logits = generate_recording_logits(rt, prompts, NEW, eos_token_id=spec.eos_token_ids)  # stops as HF does
    for i, (prompt, toks, got) in enumerate(zip(prompts, out.tokens, logits, strict=True)):
        assert toks == hf_greedy(hf, prompt, NEW, distinct=3), (name, i)
        want = hf_logits_along(hf, prompt, toks)
        assert len(got) == len(toks)
        for k, (g, w) in enumerate(zip(got, want)):
            np.testing.assert_allclose(g, w, atol=ATOL, rtol=0, err_msg=f"{name}: prompt {i}, step {k} (0: after the prompt)")


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_a_torchscript_export_goes_the_same_way(family: str, tmp_path: Path) -> None:
    """TorchScript spells the repeat of the KV heads, the rotary embedding and the norms its own way."""
    from transformers import AutoModelForCausalLM

    from qgraph.frontend.export import export_model

    fields = dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=family == "gemma")
    folder = FAMILIES[family].save_random({**BASE, **fields}, tmp_path / "hf", seed=2)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    path = export_model(hf, tmp_path / "ts.onnx", exporter="torchscript").path
    art = compile_model(path, "cpu", tmp_path / "cpu", prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=2)
    ops = [n.op_type for n in onnx.load(str(art / "decode.onnx"), load_external_data=False).graph.node]
    # 5 norms: the first reads the embedding alone, the other 4 a residual sum (fuse-skip-rms-norm, cpu's final slot).
    assert ops.count("GroupQueryAttention") == 2 and ops.count("RMSNormalization") == 1, ops
    assert ops.count("SkipSimplifiedLayerNormalization") == 4 and "Add" not in ops, ops
    out = Runtime(art).generate(PROMPTS, max_new_tokens=NEW, eos_token_id=spec_of(hf.config).eos_token_ids)
    assert out.tokens == [hf_greedy(hf, p, NEW, distinct=3) for p in PROMPTS]
