"""Fuzz the rewrite passes for a long run: random graphs with each pass's pattern, perturbed.

    python tools/fuzz_passes.py --examples 300                 # every pass
    python tools/fuzz_passes.py --pass fuse-gelu --examples 2000 --seed 7

The strategies and the check are those of ``tests/test_fuzz_passes.py`` (see
``tests/fuzz/``, one strategy module per pass): on every example a pass must either decline
(leaving the graph unchanged), refuse with a typed error, or rewrite it into a
graph that passes the ONNX checker and computes the same outputs on random
inputs. The run goes on after a failure; each failure is printed with its
graph (ONNX text), and the exit code is 1 if any example failed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def fuzz(name: str, examples: int, seed: int, show: int) -> collections.Counter[str]:
    """Run ``examples`` examples of one pass; returns the counts of outcomes."""
    from fuzz import STRATEGIES, check
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed

    counts: collections.Counter[str] = collections.Counter()
    shown = [0]

    @hyp_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate], print_blob=False,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=STRATEGIES[name])
    def run(case: object) -> None:
        counts["examples"] += 1
        try:
            outcome = check(case)  # type: ignore[arg-type]
        except Exception:
            counts["failed"] += 1
            if shown[0] < show:
                shown[0] += 1
                print(f"--- {name}: failure {counts['failed']}\n{case!r}\n{traceback.format_exc()}", file=sys.stderr)
            return
        counts[outcome.kind] += 1

    run()
    return counts


def main(argv: list[str] | None = None) -> int:
    from fuzz import STRATEGIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pass", dest="passes", action="append", choices=sorted(STRATEGIES), help="a pass to fuzz (repeatable; default: all)"
    )
    parser.add_argument("--examples", type=int, default=300, help="examples per pass (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--show", type=int, default=3, help="failures to print in full per pass (default 3)")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)  # the passes' declines and warnings are expected here
    rows = []
    for name in args.passes or list(STRATEGIES):
        start = time.perf_counter()
        c = fuzz(name, args.examples, args.seed, args.show)
        rows.append((name, c["examples"], c["rewrite"], c["decline"], c["refused"], c["failed"], time.perf_counter() - start))
        print(f"{name}: {c['examples']} examples, {c['rewrite']} rewrites, {c['decline']} declines, {c['refused']} refused, "
              f"{c['failed']} failed ({rows[-1][-1]:.0f} s)", flush=True)  # fmt: skip
    header = ("pass", "examples", "rewrites", "declines", "refused", "failed", "seconds")
    table = [header] + [(r[0], *(str(v) for v in r[1:6]), f"{r[6]:.0f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for row in table:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    return 1 if any(r[5] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
