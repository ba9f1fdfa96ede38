"""GPT-2 (``GPT2LMHeadModel``): its config fields, and what else is GPT-2-specific.

GPT-2's config names its shape ``n_layer``, ``n_head``, ``n_embd`` and
``n_positions``; this module is the only place that reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgraph.frontend.families.spec import ModelSpec, eos_token_ids

MODEL_TYPES = ("gpt2",)

#: Shapes for ``random:NAME`` models (random weights, for machines without the hub): GPT2Config fields.
RANDOM_SHAPES: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


def spec(config: Any, generation_config: Any = None) -> ModelSpec:
    """``config``'s shape; the EOS ids of ``generation_config`` (generation_config.json) where the model has one."""
    heads = int(config.n_head)
    return ModelSpec(
        family="gpt2",
        num_layers=int(config.n_layer),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=int(config.n_embd) // heads,
        hidden_size=int(config.n_embd),
        vocab_size=int(config.vocab_size),
        max_positions=int(config.n_positions),
        eos_token_ids=eos_token_ids(config, generation_config),
    )


def save_random(shape: dict[str, int], folder: Path, *, seed: int = 0) -> Path:
    """A GPT-2 of ``shape`` (config fields) with random weights, saved as a Hugging Face folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**shape)).eval().save_pretrained(folder)
    return folder


def unread_weight_bytes(model: Any) -> int:
    """Bytes of weights a decode step does not stream: the position table (one row is read)."""
    return int(model.transformer.wpe.weight.nbytes)
