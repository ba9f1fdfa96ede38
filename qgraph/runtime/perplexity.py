"""Teacher-forced scoring of a token sequence on a compiled artifact: perplexity and top-1 predictions.

A text longer than the cache is scored in windows (Hugging Face's sliding-window recipe,
:func:`windows`): a window holds up to ``ctx_len`` tokens and starts ``stride`` tokens after the
previous one; it scores only the tokens the previous window did not, so every token but the first is
scored exactly once, with at least ``ctx_len - stride`` tokens of context after the first window.

Each window starts from an empty cache at position 0. The tokens that are context only go through the
prefill specialization in chunks (as ``generate`` feeds a prompt); every token whose logits score the
next one goes through the decode specialization, one step each, fed the true token (teacher forcing).
The logits are turned into log-probabilities in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from qgraph.errors import GenerationError
from qgraph.ir.contract import pad_chunk
from qgraph.runtime.runtime import Runtime


class PerplexityError(GenerationError):
    """A text or a window that cannot be scored (too short, a stride out of range)."""


@dataclass(frozen=True)
class Window:
    """Tokens ``begin:end`` are fed from position 0; targets ``scored:end`` are scored (each predicted by the token before it)."""

    begin: int
    end: int
    scored: int


@dataclass
class Scores:
    """Per scored target, in text order: its negative log-likelihood and the model's top-1 prediction for it."""

    nll: np.ndarray  # float64
    top1: np.ndarray  # int64
    targets: np.ndarray  # int64: the true tokens

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean()))

    @property
    def accuracy(self) -> float:
        """How often the top-1 prediction is the true next token."""
        return float((self.top1 == self.targets).mean())

    def agreement(self, reference: Scores) -> float:
        """How often this run's top-1 prediction is the reference run's (same text, same windows)."""
        if reference.top1.shape != self.top1.shape:
            raise PerplexityError(f"the runs scored {len(self.top1)} and {len(reference.top1)} tokens; score the same text and windows")
        return float((self.top1 == reference.top1).mean())


def windows(n_tokens: int, ctx_len: int, stride: int) -> list[Window]:
    """The windows that score ``n_tokens`` tokens with a cache of ``ctx_len`` (see the module docstring)."""
    if n_tokens < 2:
        raise PerplexityError(f"the text has {n_tokens} token(s); perplexity needs at least 2 (one to predict from, one to score)")
    if not 1 <= stride < ctx_len:
        # stride ctx_len would leave each window's first token without context, and unscored; a larger one skips tokens.
        raise PerplexityError(
            f"the stride must be between 1 and ctx_len - 1 ({ctx_len - 1}), got {stride}; pass --stride {max(1, ctx_len // 2)}"
        )
    out: list[Window] = []
    begin = prev_end = 0
    while True:
        end = min(begin + ctx_len, n_tokens)
        out.append(Window(begin, end, max(prev_end, 1)))  # the text's first token has no context: never scored
        if end == n_tokens:
            return out
        prev_end, begin = end, begin + stride


def _log_softmax_at(logits: np.ndarray, target: int) -> tuple[float, int]:
    """(-log p(target), argmax) of one row of logits, in float64."""
    row = logits.astype(np.float64, copy=False)
    top = int(row.argmax())
    lse = row[top] + np.log(np.exp(row - row[top]).sum())
    return float(lse - row[target]), top


def score(rt: Runtime, ids: Sequence[int], wins: Sequence[Window], progress: Callable[[int, int], None] | None = None) -> Scores:
    """Score ``ids`` on ``rt`` (a :class:`qgraph.runtime.Runtime`) window by window; ``progress(done, total)`` after each window."""
    B, P, C = rt.batch_size, rt.prefill_seq_len, rt.ctx_len
    toks = np.asarray(ids, dtype=np.int64)
    nll: list[float] = []
    top1: list[int] = []
    for k, w in enumerate(wins):
        if w.end - w.begin > C:
            raise PerplexityError(f"window {w} is longer than the artifact's ctx_len {C}")
        rt.reset()
        done = 0  # tokens of the window in the cache
        # Context only (no logits wanted): prefill chunks, while a whole chunk fits the cache (the chunk contract).
        while w.begin + done < w.scored - 1 and done + P <= C:
            chunk = toks[w.begin + done : min(w.begin + done + P, w.scored - 1)].tolist()
            ids_b, pos_b = pad_chunk([chunk] + [[]] * (B - 1), [done] * B, P)
            rt.step("prefill", ids_b, pos_b)
            done += len(chunk)
        for t in range(w.begin + done, w.end - 1):
            ids_b, pos_b = pad_chunk([[int(toks[t])]] + [[]] * (B - 1), [t - w.begin] * B, 1)
            logits = rt.step("decode", ids_b, pos_b)
            if t + 1 >= w.scored:
                loss, top = _log_softmax_at(logits[0, 0], int(toks[t + 1]))
                nll.append(loss)
                top1.append(top)
        if progress is not None:
            progress(k + 1, len(wins))
    targets = np.concatenate([toks[w.scored : w.end] for w in wins])
    return Scores(np.asarray(nll, np.float64), np.asarray(top1, np.int64), targets)


__all__ = ["PerplexityError", "Scores", "Window", "score", "windows"]
