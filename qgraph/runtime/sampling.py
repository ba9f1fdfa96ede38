"""Choosing the next token: greedy, or sampled with temperature, top-k and top-p.

:func:`distribution` is what a sampled token is drawn from, built as Hugging
Face's logits warpers build it (temperature, then top-k, then top-p), so that,
seeds aside, qgraph and Hugging Face sample from the same probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qgraph.errors import GenerationError

__all__ = ["GenerationError", "Sampling", "choose", "distribution"]


@dataclass
class Sampling:
    """Greedy when temperature is 0 (the default); otherwise sampled with top-k / top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        # nan passes every comparison's negation, so each rule is written as what is allowed.
        if not (_is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationError(f"temperature must be >= 0 and finite (0 is greedy), got {self.temperature!r}")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            raise GenerationError(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k}")
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (_is_int(self.seed) and self.seed >= 0):
            raise GenerationError(f"seed must be an integer >= 0, got {self.seed}; leave it out for a fresh random seed")


def _is_real(x: object) -> bool:
    """An int or float (numpy's too), not a bool or a string."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def distribution(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The probabilities a sampled token is drawn from (temperature > 0): softmax(logits / temperature)
    over the top_k most likely tokens (all of them if top_k is 0 or larger than the vocabulary), then
    over the smallest set of those whose mass reaches top_p; ties with the last kept token are kept."""
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # the largest is 0 first: a tiny temperature makes the rest -inf, not inf - inf
        z = (z - z.max()) / sampling.temperature
    k = min(sampling.top_k, len(z))  # Hugging Face clamps top_k to the vocabulary too
    if k:
        kth = np.partition(z, -k)[-k]
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
    return p


def choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Pick the next token from one row of logits."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    p = distribution(logits, sampling)
    return int(rng.choice(len(p), p=p))
