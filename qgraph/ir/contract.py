"""Driving a graph through the retained-state contract, step by step.

A small, dependency-free loop used by the tests, the pass-debugging tool and
the runtime: it feeds ``input_ids`` and ``position_ids`` (-1 marks padding),
keeps the caches between steps by feeding each ``_RetainedState`` output back
as the next step's ``past`` input, and returns the logits of every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RETAINED_SUFFIX = "_RetainedState"
#: Metadata key of a ``qgraph export``: the context the model takes (its positions, capped by a sliding window or a
#: longrope switch), which compiles of the file read where the graph has no position table.
MAX_POSITIONS_KEY = "qgraph.max_positions"
#: ... and, where a sliding window or a longrope switch set it, why (ModelSpec.max_positions_why), for the refusal.
MAX_POSITIONS_WHY_KEY = "qgraph.max_positions_why"

#: One step: feeds in, outputs out (by name).
StepFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class CacheSpec:
    """The cache inputs of a retained-state graph."""

    names: list[str]
    shape: tuple[int, ...]  # [batch, num_kv_heads, ctx_len, head_dim]
    dtype: np.dtype

    @property
    def ctx_len(self) -> int:
        return int(self.shape[2])

    def zeros(self) -> dict[str, np.ndarray]:
        return {n: np.zeros(self.shape, self.dtype) for n in self.names}


def pad_chunk(rows: Sequence[Sequence[int]], starts: Sequence[int], width: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token rows into [batch, width] ids and positions (-1 = padding)."""
    ids = np.full((len(rows), width), pad_id, np.int64)
    pos = np.full((len(rows), width), -1, np.int64)
    for b, (row, start) in enumerate(zip(rows, starts)):
        n = len(row)
        if n > width:
            raise ValueError(f"row {b} has {n} tokens, more than the chunk width {width}")
        ids[b, :n] = row
        pos[b, :n] = np.arange(start, start + n)
    return ids, pos


def teacher_forced_logits(
    prefill: StepFn,
    decode: StepFn,
    cache: CacheSpec,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    prefill_seq_len: int,
) -> list[list[np.ndarray]]:
    """Logits per row and step: prompt prefill (chunked, padded), then forced decode.

    Row b's step 0 is the logits after its whole prompt; step k > 0 follows
    feeding ``continuations[b][k-1]``. All rows decode together; a row whose
    continuation has run out is fed padding.
    """
    batch = len(prompts)
    kv = cache.zeros()
    done = [0] * batch
    first: list[np.ndarray | None] = [None] * batch
    while any(done[b] < len(prompts[b]) for b in range(batch)):
        chunk = [list(prompts[b][done[b] : done[b] + prefill_seq_len]) for b in range(batch)]
        ids, pos = pad_chunk(chunk, done, prefill_seq_len)
        out = prefill({"input_ids": ids, "position_ids": pos, **kv})
        kv = {n: out[n + RETAINED_SUFFIX] for n in cache.names}
        for b in range(batch):
            if chunk[b]:
                done[b] += len(chunk[b])
                if done[b] == len(prompts[b]):
                    first[b] = out["logits"][b, -1].copy()
    result: list[list[np.ndarray]] = [[f] for f in first]  # type: ignore[list-item]
    steps = max((len(c) for c in continuations), default=0)
    for k in range(steps):
        rows = [[continuations[b][k]] if k < len(continuations[b]) else [] for b in range(batch)]
        starts = [len(prompts[b]) + k for b in range(batch)]
        ids, pos = pad_chunk(rows, starts, 1)
        out = decode({"input_ids": ids, "position_ids": pos, **kv})
        kv = {n: out[n + RETAINED_SUFFIX] for n in cache.names}
        for b in range(batch):
            if rows[b]:
                result[b].append(out["logits"][b, -1].copy())
    return result
