"""The timed loops of the contenders that are not qgraph's own runtime, and what the bench reads from the model.

Each loop returns (time to first token, seconds of the other ``n - 1`` tokens, the ``n`` greedy tokens) and never
stops early: every contender decodes the same number of steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from qgraph.devtools.bench.genai import write_word_tokenizer
from qgraph.errors import QGraphError
from qgraph.frontend.families import ModelSpec, family_of, random_family, random_shapes


def time_hf(model: Any, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """Hugging Face eager: a prefill, then one forward per token with its cache."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        past, toks = out.past_key_values, [tok]
        t1 = time.perf_counter()
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            toks.append(tok)
        return ttft, time.perf_counter() - t1, toks


def time_ort_raw(sess: Any, spec: ModelSpec, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """ONNX Runtime on a plain export (or the same graph quantized): the presents fed back as numpy arrays."""
    names = [o.name for o in sess.get_outputs()]
    past = {f"past_{kv}.{i}": np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
            for i in range(spec.num_layers) for kv in ("key", "value")}  # fmt: skip
    t0 = time.perf_counter()
    ids = np.array([prompt], np.int64)
    length = len(prompt)
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, length), np.int64), "position_ids": np.arange(length)[None], **past}
    out = dict(zip(names, sess.run(None, feeds)))
    tok = int(out["logits"][0, -1].argmax())
    ttft = time.perf_counter() - t0
    toks = [tok]
    t1 = time.perf_counter()
    for _ in range(n - 1):
        past = {k: out["present" + k[4:]] for k in past}
        feeds = {"input_ids": np.array([[tok]], np.int64), "attention_mask": np.ones((1, length + 1), np.int64),
                 "position_ids": np.array([[length]], np.int64), **past}  # fmt: skip
        out = dict(zip(names, sess.run(None, feeds)))
        tok = int(out["logits"][0, -1].argmax())
        toks.append(tok)
        length += 1
    return ttft, time.perf_counter() - t1, toks


def model_folder(model: str, workdir: Path) -> str:
    """A hub id / folder / tiny-gpt2 as is; ``random:NAME`` saved to a folder with random weights and a word-level
    tokenizer of its vocabulary (what onnxruntime-genai's builder needs)."""
    if not model.startswith("random:"):
        return model
    found = random_family(model.split(":", 1)[1])
    if found is None:
        raise QGraphError(f"unknown random model '{model}'; choose random:{'|random:'.join(random_shapes())}")
    family, shape = found
    folder = workdir / model.replace(":", "-")
    if not (folder / "config.json").is_file():
        family.save_random(shape, folder)
    if not (folder / "tokenizer.json").is_file():  # the vocabulary as saved: a shape may leave it to the config's default
        write_word_tokenizer(folder, int(json.loads((folder / "config.json").read_text())["vocab_size"]))
    return str(folder)


def streamed_weight_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter (a tied one once) but those its family says a step
    does not read and an input embedding that is not also the output projection (a step reads one row of it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total -= family_of(model.config).unread_weight_bytes(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or emb.weight.data_ptr() != head.weight.data_ptr():
        total -= emb.weight.numel() * emb.weight.element_size()
    return int(total)


def leading_agreement(tokens: list[int], reference: list[int]) -> int:
    """How many of ``tokens`` equal ``reference`` before the first difference."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return min(len(tokens), len(reference))
