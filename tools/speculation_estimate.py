#!/usr/bin/env python
"""What prompt-lookup speculative decoding would buy, measured, before anyone builds it.

    python tools/speculation_estimate.py RAW.onnx [--widths 2,4,8] [--workdir DIR] [--pairs 60]
        [--prompts 4] [--prompt-len 32] [--new-tokens 64] [--threads 2]

Speculative decoding checks k drafted tokens in one pass of width k + 1: the
weights are read once for up to k + 1 tokens, and greedy output stays the
model's own (a draft token is kept only where it equals the model's choice).
Prompt lookup drafts by copying what followed the last earlier occurrence of
the newest n-gram (n = 3, 2, 1), the copy allowed to run into itself.

Two figures decide whether it pays, and this script measures both:

* the cost of a pass of width W against a decode step: for each W, a ``cpu``
  artifact whose prefill graph is W wide (compiled into ``--workdir``, reused),
  one decode step and one W-wide pass at the same position taken in turn
  (``qgraph.bench.in_turn``), the median of their ratios. That prefill graph
  projects its last position onto the vocabulary, where a verifying pass needs
  all W: the cost of the W - 1 further rows is measured apart (a [W, hidden] x
  [hidden, vocab] MatMul against a [1, hidden] one, in turn) and added. The
  weight is a constant there, pre-packed by ONNX Runtime: fed as an input, as
  the ``cpu`` target feeds this projection, ONNX Runtime packs it on every run
  of more than one row (measured: +12 to +15 ms), so a verifying graph would
  have to keep it constant;
* tokens per pass: greedy text from the decode graph for random prompts (the
  bench's kind), replayed through the lookup with k = W - 1 drafts. Greedy
  decoding is deterministic, so the replay gives the passes exactly, up to
  rounding differences between a wide pass and single steps.

Estimated decode time per token = decode step x cost ratio / tokens per pass.
Nothing here is used by qgraph itself (see PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def lookup_draft(seq: Sequence[int], k: int, max_ngram: int = 3) -> list[int]:
    """Up to ``k`` tokens copied from after the last earlier occurrence of the newest n-gram (longest n first)."""
    for n in range(max_ngram, 0, -1):
        if len(seq) <= n:
            continue
        tail = list(seq[-n:])
        for s in range(len(seq) - n - 1, -1, -1):
            if list(seq[s : s + n]) == tail:
                ext = list(seq)
                for j in range(k):  # the copy may run into the tokens it has just drafted
                    ext.append(ext[s + n + j])
                return ext[len(seq) :]
    return []


def lookup_passes(prompt: Sequence[int], generated: Sequence[int], k: int) -> int:
    """Passes a prompt-lookup decoder drafting ``k`` tokens needs to produce ``generated`` (greedy) after ``prompt``.

    Each pass keeps the drafts that match the greedy tokens, plus the model's own next token."""
    seq, i, passes = list(prompt), 0, 0
    while i < len(generated):
        draft = lookup_draft(seq, k)
        kept = 0
        while kept < len(draft) and i + kept < len(generated) and draft[kept] == generated[i + kept]:
            kept += 1
        n = min(kept + 1, len(generated) - i)
        seq += generated[i : i + n]
        i, passes = i + n, passes + 1
    return passes


def vocab_product(hidden: int, vocab: int, threads: int) -> Any:
    """An ONNX Runtime session of [m, hidden] x [hidden, vocab] in fp32, the weight a constant (pre-packed)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((hidden, vocab), dtype=np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "rows",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", hidden])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", vocab])],
                          [numpy_helper.from_array(w, "w")])  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def extra_rows_s(product: Any, rows: int, pairs: int) -> float:
    """Median seconds ``product`` (:func:`vocab_product`) takes on ``rows`` rows over one row, taken in turn."""
    from qgraph.devtools.bench import in_turn, timed

    hidden = int(product.get_inputs()[0].shape[1])
    feeds = [{"x": np.ones((m, hidden), np.float32)} for m in (1, rows)]
    for f in feeds:
        product.run(None, f)
    one, many = in_turn([timed(lambda: product.run(None, feeds[0])), timed(lambda: product.run(None, feeds[1]))], pairs)
    return statistics.median(b - a for a, b in zip(one, many))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("raw", help="a raw export (qgraph export, or a bench workdir's raw.onnx)")
    ap.add_argument("--widths", default="2,4,8", help="pass widths W to measure (k = W - 1 drafts)")
    ap.add_argument("--workdir", default="speculation-artifacts")
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--prompts", type=int, default=4, help="random prompts to generate from")
    ap.add_argument("--input-ids", action="append", default=[], help="a prompt as token ids, e.g. 1,2,3 (repeatable; "
                    "replaces the random prompts)")  # fmt: skip
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from qgraph.devtools.bench import in_turn, timed
    from qgraph.runtime import Runtime

    widths = [int(w) for w in args.widths.split(",")]
    if any(w < 2 for w in widths):
        ap.error("every width must be at least 2 (one draft token)")
    longest = max([len(ids.split(",")) for ids in args.input_ids] + [args.prompt_len])
    ctx = max(128, longest + args.new_tokens + max(widths))
    texts: list[tuple[list[int], list[int]]] = []
    product = None  # the vocabulary projection with a constant weight, built once (154 MB for GPT-2)
    for w in widths:
        art = Path(args.workdir) / f"w{w}"
        if not (art / "manifest.json").exists():
            print(f"compiling {art} (prefill width {w})", flush=True)
            subprocess.run([sys.executable, "-m", "qgraph.cli", "compile", args.raw, "--target", "cpu", "-o", str(art),
                            "--prefill-seq-len", str(w), "--ctx-len", str(ctx), "--threads", str(args.threads)],
                           check=True)  # fmt: skip
        rt = Runtime(art, threads=args.threads)
        if not texts:  # greedy text does not depend on the prefill width; generated once
            rng = np.random.default_rng(0)
            prompts = [[int(t) for t in ids.split(",")] for ids in args.input_ids] or [
                rng.integers(0, rt.vocab_size, args.prompt_len).tolist() for _ in range(args.prompts)
            ]
            for prompt in prompts:
                texts.append((prompt, rt.generate([prompt], max_new_tokens=args.new_tokens).tokens[0]))
        rt.reset()
        p = min(args.prompt_len, rt.ctx_len - w)  # a reused artifact keeps the ctx_len it was compiled with
        one = (np.array([[1]], np.int64), np.array([[p]], np.int64))
        wide = (np.ones((1, w), np.int64), (p + np.arange(w, dtype=np.int64))[None])
        for _ in range(3):  # warm both graphs
            rt.step("decode", *one)
            rt.step("prefill", *wide)
        step_s, pass_s = in_turn([timed(lambda r=rt, x=one: r.step("decode", *x)),
                                  timed(lambda r=rt, x=wide: r.step("prefill", *x))], args.pairs)  # fmt: skip
        step_ms = statistics.median(step_s) * 1e3
        ratio_last = statistics.median(b / a for a, b in zip(step_s, pass_s))
        if product is None:
            heads, head_dim = rt.cache_shape[1], rt.cache_shape[3]  # past_key: [batch, heads, ctx, head_dim]
            product = vocab_product(heads * head_dim, rt.vocab_size, args.threads)
        extra_ms = extra_rows_s(product, w, args.pairs) * 1e3
        ratio = ratio_last + extra_ms / step_ms
        made = sum(len(g) for _, g in texts)
        per_pass = made / sum(lookup_passes(pr, g, w - 1) for pr, g in texts)
        print(f"width {w}: decode step {step_ms:.2f} ms, a {w}-wide pass costs {ratio_last:.3f}x a step "
              f"(median of {args.pairs} pairs), {ratio:.3f}x with logits for all {w} positions (+{extra_ms:.2f} ms); prompt lookup keeps {per_pass:.2f} tokens per pass over {made} greedy "
              f"tokens -> about {step_ms * ratio / per_pass:.2f} ms/token ({per_pass / ratio:.2f}x plain decode)", flush=True)  # fmt: skip
        del rt
    distinct = [len(set(g)) for _, g in texts]
    print(f"distinct tokens in each greedy text: {distinct} of {args.new_tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
