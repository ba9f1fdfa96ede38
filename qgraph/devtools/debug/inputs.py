"""A graph's signature and the fixed inputs every stage is fed.

Fixed inputs. ``batch`` rows (the pinned batch size, else 2) of a
``prompt_len``-token prompt followed by ``decode_steps`` teacher-forced tokens,
drawn with a fixed seed below the vocabulary size (the logits' last dim). How a
graph is driven depends on its signature, so the comparison survives
``retain-kv-cache``:

* raw (``input_ids``, optional ``attention_mask``/``position_ids``, ``past*``
  inputs paired with the outputs after ``logits`` in order): a prefill of the
  whole prompt with an empty past, then one token per step, each step feeding
  the previous presents back as the past. Logits of every position. A raw
  graph with pinned shapes (pin-static-shapes before retain-kv-cache) runs
  once: its pinned ``seq_len`` tokens after a zero past that the
  attention_mask hides.
* retained (``past_*`` inputs with ``<name>_RetainedState`` outputs):
  :func:`qgraph.contract.teacher_forced_logits`, prefill in chunks of the
  graph's pinned ``seq_len`` (else the whole prompt), then decode. A graph
  pinned to ``seq_len`` S > 1 decodes with the token padded to width S
  (position -1 marks padding in the contract), so every stage runs at its own
  pinned shape without re-pinning. Such a step fills slots p .. p+S-1, as a
  prompt chunk does, so the fixed inputs stop S-1 tokens short of the cache's
  end (the chunk contract of fuse-decode-attention's rewrite). Logits of the
  last valid position of each step only.
* anything else (generic): every input gets fixed values (floats uniform in
  [0.5, 1.5), integers 0, symbolic dims 2) and every output is compared by
  name; there is no top-1 token.

How each kind is run and compared is :mod:`qgraph.devtools.debug.execute`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qgraph.errors import GraphCheckError
from qgraph.ir.contract import RETAINED_SUFFIX
from qgraph.ir.graph import Graph
from qgraph.pipeline.optimize import graph_max_positions

DEFAULT_BATCH = 2
PROMPT_LEN = 7
DECODE_STEPS = 3
#: Symbolic dims of a generic graph's inputs get this size.
GENERIC_DIM = 2


@dataclass
class Signature:
    """How to drive a graph: its kind and the IO names that matter."""

    kind: str  # "raw", "retained" or "generic"
    pasts: list[str] = field(default_factory=list)
    presents: list[str] = field(default_factory=list)
    logits: str = ""
    why_generic: str = ""


_RAW_INPUTS = ("input_ids", "attention_mask", "position_ids")


def signature(graph: Graph) -> Signature:
    """Tell a raw export, a retained-state graph and anything else apart."""
    ins = {t.name: t for t in graph.inputs}
    outs = [t.name for t in graph.outputs]
    if "input_ids" not in ins:
        return Signature("generic", why_generic="no input_ids input")
    retained = [n for n in ins if n + RETAINED_SUFFIX in outs]
    if retained:
        if "logits" not in outs:
            return Signature("generic", why_generic="a retained-state graph without a logits output")
        extra = [n for n in ins if n not in retained and n not in ("input_ids", "position_ids")]
        if extra or "position_ids" not in ins:
            return Signature("generic", why_generic=f"retained-state inputs besides input_ids/position_ids/caches: {extra}")
        return Signature("retained", pasts=retained, presents=[n + RETAINED_SUFFIX for n in retained], logits="logits")
    logits = "logits" if "logits" in outs else (outs[0] if outs else "")
    pasts = [n for n in ins if n not in _RAW_INPUTS]
    presents = [n for n in outs if n != logits]
    rank = len(graph.outputs[outs.index(logits)].shape or []) if logits else 0
    if rank != 3:
        return Signature("generic", why_generic=f"output '{logits}' is not [batch, seq, vocab] logits")
    if len(pasts) != len(presents):
        return Signature("generic", why_generic=f"{len(pasts)} past inputs but {len(presents)} outputs besides the logits")
    for name in pasts:
        shape = ins[name].shape
        if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            return Signature("generic", why_generic=f"input '{name}' is not a [batch, heads, past, head_dim] cache")
    return Signature("raw", pasts=pasts, presents=presents, logits=logits)


def vocab_size(graph: Graph, sig: Signature) -> int | None:
    for t in graph.outputs:
        if t.name == sig.logits and t.shape and isinstance(t.shape[-1], int):
            return int(t.shape[-1])
    # The token embedding that input_ids index.
    for t in graph.inputs:
        if t.name == "input_ids":
            for node in t.outputs:
                if node.op == "Gather" and node.inputs[1] is t and node.inputs[0].shape and isinstance(node.inputs[0].shape[0], int):
                    return int(node.inputs[0].shape[0])
    return None


@dataclass
class FixedInputs:
    """What every stage is fed: prompts and teacher-forced continuations, or generic feeds."""

    kind: str  # "lm" or "generic"
    batch: int = 0
    prompts: list[list[int]] = field(default_factory=list)
    continuations: list[list[int]] = field(default_factory=list)
    vocab: int = 0
    ctx_len: int = 0
    feeds: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def prompt_len(self) -> int:
        return len(self.prompts[0]) if self.prompts else 0

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "generic":
            return {"kind": "generic", "feeds": {k: list(v.shape) for k, v in self.feeds.items()}}
        return {
            "kind": "lm",
            "batch": self.batch,
            "prompt_len": self.prompt_len,
            "decode_steps": len(self.continuations[0]),
            "vocab": self.vocab,
            "ctx_len": self.ctx_len,
            "prompts": self.prompts,
            "continuations": self.continuations,
        }


def fixed_inputs(
    graph: Graph,
    sig: Signature,
    *,
    batch_size: int | None,
    ctx_len: int,
    prompt_len: int = PROMPT_LEN,
    decode_steps: int = DECODE_STEPS,
    seed: int = 0,
    seq_len: int | None = None,
) -> FixedInputs:
    """Deterministic inputs derived from the input graph's signature.

    ``seq_len`` is the width a pipeline pins (else the input graph's own pinned
    width, if any): a pinned graph of width S decodes position p as a chunk of
    S slots, so the inputs end S-1 tokens before the cache does.
    """
    rng = np.random.default_rng(seed)
    if sig.kind == "generic":
        feeds: dict[str, np.ndarray] = {}
        sizes: dict[str, int] = {}
        for t in graph.inputs:
            shape = [d if isinstance(d, int) else sizes.setdefault(str(d), GENERIC_DIM) for d in (t.shape or [])]
            dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
            if dtype.kind == "f":
                feeds[t.name] = rng.uniform(0.5, 1.5, shape).astype(dtype)
            else:
                feeds[t.name] = np.zeros(shape, dtype)
        return FixedInputs("generic", feeds=feeds)
    ids = next(t for t in graph.inputs if t.name == "input_ids")
    batch = batch_size or (ids.shape[0] if ids.shape and isinstance(ids.shape[0], int) else DEFAULT_BATCH)
    vocab = vocab_size(graph, sig)
    if vocab is None:
        raise GraphCheckError("cannot tell the vocabulary size (the logits' last dim is not a number); pin it in the input graph")
    if sig.kind == "retained":
        shape = next(t.shape for t in graph.inputs if t.name == sig.pasts[0])
        if not shape or not isinstance(shape[2], int):
            raise GraphCheckError(f"the cache '{sig.pasts[0]}' has no fixed length (dim 2); it is not a retained-state graph")
        ctx_len = int(shape[2])
    if seq_len is None and ids.shape and len(ids.shape) > 1 and isinstance(ids.shape[1], int):
        seq_len = int(ids.shape[1])
    context = min(ctx_len, graph_max_positions(graph) or ctx_len)
    if context < 2:
        raise GraphCheckError(f"a context of {context} tokens is too short to prefill and decode; raise --ctx-len")
    width = seq_len or 1
    limit = min(context, ctx_len - (width - 1))
    if limit < 2:
        raise GraphCheckError(f"a cache of {ctx_len} slots is too short to decode through chunks of {width} (seq_len); "
                              f"raise --ctx-len to at least {width + 1}")  # fmt: skip
    decode_steps = max(1, min(decode_steps, limit // 2))
    prompt_len = max(1, min(prompt_len, limit - decode_steps))
    prompts = rng.integers(0, vocab, (batch, prompt_len)).tolist()
    conts = rng.integers(0, vocab, (batch, decode_steps)).tolist()
    return FixedInputs("lm", batch, prompts, conts, vocab, ctx_len)
