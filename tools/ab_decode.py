#!/usr/bin/env python
"""Compare the decode (and prefill) step of two compiled artifacts, in both orders.

    python tools/ab_decode.py ART_A ART_B [--steps 300] [--prefills 40] [--threads 2] [--json]

Each order runs in a fresh process that opens both runtimes and alternates
single steps of the two (so a slow second on the shared machine slows both
sides alike), then takes the median of the paired differences. The runtime
opened second is favoured by 0.1-0.25 ms/token on the development VMs (an
artifact against itself shows it), so one order alone overstates or hides a
change of that size; with both orders,

    effect = (d(A then B) - d(B then A)) / 2     (B - A: negative means B is faster)
    bias   = (d(A then B) + d(B then A)) / 2     (the advantage of the runtime opened second)

where d(X then Y) is the median over pairs of (Y's step - X's step) with X
opened first. Greedy tokens are fed to both, and the largest logits
difference is reported. See PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_order(first: str, second: str, steps: int, prefills: int, threads: int) -> dict[str, Any]:
    """Open ``first`` then ``second``; paired medians of (second - first) for decode and prefill, in ms."""
    from qgraph.runtime import Runtime

    ra, rb = Runtime(first, threads=threads), Runtime(second, threads=threads)
    if (ra.batch_size, ra.prefill_seq_len, ra.ctx_len) != (rb.batch_size, rb.prefill_seq_len, rb.ctx_len):
        raise SystemExit("the two artifacts differ in batch size, prefill length or ctx_len")
    b, p, ctx = ra.batch_size, ra.prefill_seq_len, ra.ctx_len
    prompt = np.random.default_rng(0).integers(0, min(ra.vocab_size, rb.vocab_size), (b, p))
    positions = np.tile(np.arange(p), (b, 1))
    out: dict[str, Any] = {}

    def pair(i: int, run: Any, setup: Any = None) -> tuple[dict[int, float], dict[int, Any]]:
        """``run(r)`` timed on both runtimes (``setup(r)`` untimed before it), which goes first alternating;
        seconds and results by runtime id."""
        times, results = {}, {}
        for r in (ra, rb) if i % 2 == 0 else (rb, ra):
            if setup is not None:
                setup(r)
            t = time.perf_counter()
            results[id(r)] = run(r)
            times[id(r)] = time.perf_counter() - t
        return times, results

    def prefill(r: Any) -> None:
        r.step("prefill", prompt, positions)

    def reset(r: Any) -> None:
        r.reset()

    pre = [times[id(rb)] - times[id(ra)] for times, _ in (pair(i, prefill, reset) for i in range(prefills))]
    for r in (ra, rb):
        reset(r)
        prefill(r)
    tok = np.zeros((b, 1), np.int64)
    diffs, a_ms, b_ms, worst = [], [], [], 0.0
    for i in range(steps):
        pos = np.full((b, 1), p + i % max(1, ctx - p), np.int64)
        times, logits = pair(i, lambda r, tok=tok, pos=pos: r.step("decode", tok, pos).copy())
        diffs.append(times[id(rb)] - times[id(ra)])
        a_ms.append(times[id(ra)])
        b_ms.append(times[id(rb)])
        worst = max(worst, float(np.abs(logits[id(ra)] - logits[id(rb)]).max()))
        tok = logits[id(ra)][:, 0].argmax(-1)[:, None].astype(np.int64)
    out["decode_diff_ms"] = float(np.median(diffs) * 1e3)
    out["decode_first_ms"] = float(np.median(a_ms) * 1e3)
    out["decode_second_ms"] = float(np.median(b_ms) * 1e3)
    out["prefill_diff_ms"] = float(np.median(pre) * 1e3) if pre else None
    out["max_logits_diff"] = worst
    return out


def _run_order(first: str, second: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, first, second, "--one-order", "--steps", str(args.steps), "--prefills", str(args.prefills),
           "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the run {first} then {second} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> dict[str, Any]:
    ab = _run_order(args.a, args.b, args)
    ba = _run_order(args.b, args.a, args)
    result: dict[str, Any] = {"a": args.a, "b": args.b, "steps": args.steps, "prefills": args.prefills, "a_then_b": ab, "b_then_a": ba}
    for kind in ("decode", "prefill"):
        x, y = ab[f"{kind}_diff_ms"], ba[f"{kind}_diff_ms"]
        if x is not None and y is not None:
            result[f"{kind}_effect_ms"] = (x - y) / 2
            result[f"{kind}_second_opened_bias_ms"] = (x + y) / 2
    result["max_logits_diff"] = max(ab["max_logits_diff"], ba["max_logits_diff"])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="artifact A (the reference)")
    ap.add_argument("b", help="artifact B (the change)")
    ap.add_argument("--steps", type=int, default=300, help="alternating decode steps per order (default 300)")
    ap.add_argument("--prefills", type=int, default=40, help="alternating prefill steps per order (default 40; 0 skips)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the JSON object instead of the summary")
    ap.add_argument("--one-order", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one_order:
        print(json.dumps(one_order(args.a, args.b, args.steps, args.prefills, args.threads)))
        return 0
    for art in (args.a, args.b):
        if not (Path(art) / "manifest.json").is_file():
            ap.error(f"{art} is not a compiled artifact (no manifest.json)")
    r = compare(args)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    ab, ba = r["a_then_b"], r["b_then_a"]
    print(f"decode, median of {args.steps} paired steps: A then B {ab['decode_diff_ms']:+.3f} ms, B then A {ba['decode_diff_ms']:+.3f} ms")
    print(f"decode B - A: {r['decode_effect_ms']:+.3f} ms/token (the runtime opened second gains {-r['decode_second_opened_bias_ms']:.3f})")
    if "prefill_effect_ms" in r:
        print(f"prefill B - A: {r['prefill_effect_ms']:+.3f} ms (median of {args.prefills} paired prefills per order)")
    print(f"largest logits difference: {r['max_logits_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
