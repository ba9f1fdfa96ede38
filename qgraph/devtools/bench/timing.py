"""Timing helpers: a function made to return its seconds, and sides taken in turn so that a noisy neighbour slows all of them alike."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Alternations of one decode step, one kernel-ceiling run and one run of the bound's product (the three
#: taken in turn in each of their six orders), for the figures paired in time.
PAIRS = 120
#: Alternations of a qgraph prefill and a plain ONNX Runtime prefill for the TTFT paired in time, and the pause
#: before each (the plain session spins its idle workers for a while after a run, as ONNX Runtime does by default).
TTFT_PAIRS = 40
TTFT_PAUSE_S = 0.2
#: Alternations of a whole qgraph generation and a whole onnxruntime-genai one at the same precision, each after
#: GENERATION_PAUSE_S (as in the rounds): the ratio against genai paired in time, beside the rounds' few samples.
GENAI_PAIRS = 8
GENERATION_PAUSE_S = 0.5


def timed(fn: Callable[[], Any]) -> Callable[[], float]:
    """``fn`` made to return the seconds it took."""

    def run() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return run


def in_turn(sides: Sequence[Callable[[], float]], count: int, pause_s: float = 0.0) -> list[list[float]]:
    """What each side returns, the sides taken in turn ``count`` times; one list per side.

    Each turn runs within a short time, so a slow minute on a shared machine
    slows every side alike; the order of the sides goes through all their
    permutations (two sides: the first alternates), as the second of two
    back-to-back runs may gain or lose from the first. ``pause_s``: a sleep
    before each run. Take differences and ratios within each turn.
    """
    orders = list(itertools.permutations(range(len(sides))))
    out: list[list[float]] = [[] for _ in sides]
    for i in range(count):
        for side in orders[i % len(orders)]:
            if pause_s:
                time.sleep(pause_s)
            out[side].append(sides[side]())
    return out


def paired_in_time(rt: Any, others: list[tuple[Any, dict[str, np.ndarray]]], prompt_len: int, ctx: int) -> list[list[float]]:
    """Seconds of one qgraph decode step and of one run of each other session, taken in turn ``PAIRS`` times
    (:func:`in_turn`); one list per side, the decode step first. The step's position moves on each turn."""
    ids = np.zeros((rt.batch_size, 1), np.int64)
    turns = itertools.count()

    def step() -> None:
        pos = np.full((rt.batch_size, 1), prompt_len + next(turns) % max(1, ctx - prompt_len), np.int64)
        rt.step("decode", ids, pos)

    runs = [timed(lambda sess=sess, feeds=feeds: sess.run(None, feeds)) for sess, feeds in others]
    return in_turn([timed(step), *runs], PAIRS)
