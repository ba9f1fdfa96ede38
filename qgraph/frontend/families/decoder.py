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
    limit = rope_limit(config)
    return ModelSpec(
        family=family,
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        max_positions=min([positions] + [n for n in (window, limit) if n is not None]),
        eos_token_ids=eos_token_ids(config, generation_config),
        sliding_window=window,
        rope_limit=limit,
        exporter="torchscript" if _rope_type(config) == "dynamic" else "dynamo",
    )


def sliding_window(config: Any) -> int | None:
    """The window the config's attention looks back over, or None: Mistral's and Phi-3's ``sliding_window``, Qwen2's
    where ``use_sliding_window`` is set and some layer slides (Hugging Face slides only the layers from
    ``max_window_layers`` on; its ``layer_types`` lists them)."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, (list, tuple)) and kinds:
        return int(window) if "sliding_attention" in kinds else None
    full = getattr(config, "max_window_layers", None)  # transformers without layer_types: the same rule
    if full is not None and int(full) >= int(config.num_hidden_layers):
        return None
    return int(window)


def rope_limit(config: Any) -> int | None:
    """Where a longrope rotary (Phi-3's long-context configs) switches from its short factors to its long ones, or None.

    Hugging Face picks the factors from the sequence's length at every forward (the long ones once it passes
    ``original_max_position_embeddings``), so one exported table is that model only below the switch. (``dynamic``
    NTK scaling changes only past ``max_position_embeddings``, which already caps the context.)
    """
    if _rope_type(config) != "longrope":
        return None
    switch = _rope(config).get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    return int(switch) if switch else None


def _rope(config: Any) -> dict[str, Any]:
    """The config's rotary parameters (``rope_parameters`` in newer transformers, ``rope_scaling`` before), or {}."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return rope if isinstance(rope, dict) else {}


def _rope_type(config: Any) -> str | None:
    rope = _rope(config)
    kind = rope.get("rope_type") or rope.get("type")
    return str(kind) if kind else None


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
