"""What qgraph needs to know about a model, whatever its family."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """A model's shape, read once from its config by its family module."""

    family: str
    num_layers: int
    num_heads: int
    #: Heads of the KV cache (``num_heads`` unless the family groups them).
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    #: Positions the model has embeddings for (the longest context it can take).
    max_positions: int
    eos_token_ids: tuple[int, ...] = ()
