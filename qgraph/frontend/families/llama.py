"""Llama (``LlamaForCausalLM``).

Its config names its shape as every Llama-style decoder does (:mod:`qgraph.frontend.families.decoder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgraph.frontend.families import decoder
from qgraph.frontend.families.spec import ModelSpec

MODEL_TYPES = ("llama",)
#: Shapes for ``random:NAME`` models: LlamaConfig fields.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    # The shape of the Llama-family speed target: 125 M parameters, grouped KV heads, untied.
    "llama": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        initializer_range=decoder.RANDOM_INIT_RANGE,
    ),
}
unread_weight_bytes = decoder.unread_weight_bytes


def spec(config: Any, generation_config: Any = None) -> ModelSpec:
    """``config``'s shape; the EOS ids of ``generation_config`` where the model has one."""
    return decoder.spec("llama", config, generation_config)


def save_random(shape: dict[str, Any], folder: Path, *, seed: int = 0) -> Path:
    """A LlamaForCausalLM of ``shape`` (config fields) with random weights, saved as a Hugging Face folder."""
    return decoder.save_random("LlamaConfig", "LlamaForCausalLM", shape, folder, seed=seed)
