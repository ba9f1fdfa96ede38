"""Choosing the next token: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qgraph.errors import GenerationError

__all__ = ["GenerationError", "Sampling", "choose"]


@dataclass
class Sampling:
    """Greedy when temperature is 0 (the default); otherwise sampled with top-k / top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


def choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Pick the next token from one row of logits."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        kth = np.partition(z, -sampling.top_k)[-sampling.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if sampling.top_p < 1:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < sampling.top_p  # the smallest set whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))
