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

import pytest

from qgraph.frontend.families import FAMILIES
from qgraph.frontend.families.decoder import RANDOM_INIT_RANGE
from qgraph.ir.graph import Graph
from qgraph.pipeline.optimize import optimize

torch = pytest.importorskip("torch")

ATOL = 1e-3
PREFILL = 4
CTX = 40
NEW = 10
PROMPTS = [[5, 17, 42], [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [100, 3, 9, 9, 1]]  # one longer than two chunks
BASE: dict[str, Any] = dict(
    hidden_size=48, num_hidden_layers=2, intermediate_size=96, vocab_size=211, max_position_embeddings=128,
    initializer_range=RANDOM_INIT_RANGE,
)  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
#: id -> (family, config fields beyond BASE). Between them: GQA ratios 1, 2, 4; head_dim != hidden / heads; rope scaling; tied/untied.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa2-linear": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-gqa4-llama3-head_dim": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=10, tie_word_embeddings=True,
                                                 rope_scaling=LLAMA3)),
    "qwen2-gqa4-tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "phi3-mha-untied": ("phi3", dict(num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, tie_word_embeddings=False)),
    "gemma-gqa2-head_dim": ("gemma", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=20)),
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
