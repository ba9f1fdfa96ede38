"""The runtime: run a compiled artifact, generate tokens, report latency."""

from __future__ import annotations

from qgraph.runtime.runtime import GenerationOutput, Runtime, Stats
from qgraph.runtime.sampling import GenerationError, Sampling

__all__ = ["GenerationError", "GenerationOutput", "Runtime", "Sampling", "Stats"]
