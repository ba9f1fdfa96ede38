"""What the Llama-style decoder families share: their config names and random models.

Llama, Mistral, Qwen2, Phi-3 and Gemma name their shape the same way
(``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
``hidden_size``, ``max_position_embeddings``, optionally ``head_dim``); each
family module calls :func:`spec` with its own name and adds what is its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgraph.errors import ModelSourceError
from qgraph.frontend.families.spec import ModelSpec, eos_token_ids

#: The weight init of random models: Hugging Face's default (0.02) gives models that repeat one token under greedy
#: decoding, which hides cache and position bugs; 0.3 gives varied tokens with clear argmax gaps.
RANDOM_INIT_RANGE = 0.3


def spec(family: str, config: Any, generation_config: Any = None) -> ModelSpec:
    """``config``'s shape, for the Llama-style family ``family``."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % kv_heads:
        raise ModelSourceError(
            f"the model has {heads} attention heads and {kv_heads} KV heads; the heads must be a multiple of the KV heads"
        )
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    positions = int(config.max_position_embeddings)
    window = sliding_window(config)
    return ModelSpec(
        family=family,
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        max_positions=positions if window is None else min(positions, window),
        eos_token_ids=eos_token_ids(config, generation_config),
        sliding_window=window,
    )


def sliding_window(config: Any) -> int | None:
    """The window the config's attention looks back over, or None: Mistral's and Phi-3's ``sliding_window``, Qwen2's
    where ``use_sliding_window`` is set."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def save_random(config_class: str, model_class: str, shape: dict[str, Any], folder: Path, *, seed: int = 0) -> Path:
    """A model of ``shape`` (config fields) with random weights, saved as a Hugging Face folder."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**shape)
    getattr(transformers, model_class)(config).eval().save_pretrained(folder)
    return folder


def unread_weight_bytes(model: Any) -> int:
    """Bytes of weights a decode step does not stream: none (rotary positions have no table)."""
    return 0
