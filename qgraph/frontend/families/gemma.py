"""Gemma (``GemmaForCausalLM``: RMSNorm with 1 + weight, scaled embeddings, GeGLU, tied embeddings).

Its config names its shape as every Llama-style decoder does (:mod:`qgraph.frontend.families.decoder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgraph.frontend.families import decoder
from qgraph.frontend.families.spec import ModelSpec

MODEL_TYPES = ("gemma",)
#: Shapes for ``random:NAME`` models: GemmaConfig fields.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {}
unread_weight_bytes = decoder.unread_weight_bytes


def spec(config: Any, generation_config: Any = None) -> ModelSpec:
    """``config``'s shape; the EOS ids of ``generation_config`` where the model has one."""
    return decoder.spec("gemma", config, generation_config)


def save_random(shape: dict[str, Any], folder: Path, *, seed: int = 0) -> Path:
    """A GemmaForCausalLM of ``shape`` (config fields) with random weights, saved as a Hugging Face folder."""
    return decoder.save_random("GemmaConfig", "GemmaForCausalLM", shape, folder, seed=seed)
