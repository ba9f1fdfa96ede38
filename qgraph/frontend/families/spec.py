"""What qgraph needs to know about a model, whatever its family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    #: The attention window of a model that only looks back so far (Mistral's ``sliding_window``), or None. qgraph's
    #: cache keeps every position, so it honours a window only while ctx_len is within it: ``max_positions`` is capped.
    sliding_window: int | None = None
    #: The length past which the model's rotary frequencies change with the sequence's own length (longrope's
    #: ``original_max_position_embeddings``: short factors up to it, long factors for every position past it), or None.
    #: A compiled graph keeps one table, so it matches Hugging Face only while ctx_len is within it: ``max_positions``
    #: is capped.
    rope_limit: int | None = None
    #: The exporter that traces the model by default: dynamo, or torchscript where torch.export cannot (a ``dynamic``
    #: NTK rotary's check of the sequence's length, which TorchScript's trace takes below ``max_position_embeddings``).
    exporter: str = "dynamo"

    def max_positions_why(self) -> str | None:
        """What caps the context at ``max_positions``, in words that follow "ctx_len N is longer than", or None where
        it is the model's own positions."""
        n = self.max_positions
        if n == self.sliding_window:
            return (f"the model's sliding attention window {n}: qgraph's cache keeps every position, so it cannot drop the "
                    "ones that fall out of the window")  # fmt: skip
        if n == self.rope_limit:
            return (f"{n}, where the model's longrope rotary switches to its long factors (original_max_position_embeddings): "
                    "Hugging Face then recomputes every position's angle, a compiled graph keeps one table")  # fmt: skip
        return None


def eos_token_ids(config: Any, generation_config: Any = None) -> tuple[int, ...]:
    """The EOS ids Hugging Face's generate stops at: generation_config.json's where the model has one (even
    when it names none: then there are none, as there are for HF), else the config's; one id or a list."""
    eos = config.eos_token_id if generation_config is None else generation_config.eos_token_id
    return () if eos is None else (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)
