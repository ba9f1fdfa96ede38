"""Time the default pipeline on ONNX files, not counting load and save.

    python tools/time_pipeline.py /tmp/qm/gpt2/raw.onnx /tmp/qm/gpt2-xl/raw.onnx

Each file is loaded afresh ``--repeats`` times; the best time is printed with
the per-pass times of that run, and the ratio of the last file to the first.
"""

from __future__ import annotations

import argparse
import time

from qgraph.ir.graph import Graph
from qgraph.pipeline.optimize import optimize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ctx-len", type=int, default=None, help="default: the options' default")
    args = ap.parse_args()
    best: dict[str, float] = {}
    for f in args.files:
        runs = []
        for _ in range(args.repeats):
            g = Graph.load(f)
            n = g.node_count()
            t = time.perf_counter()
            report = optimize(g, ctx_len=args.ctx_len)
            runs.append((time.perf_counter() - t, report))
        secs, report = min(runs, key=lambda r: r[0])
        best[f] = secs
        passes = ", ".join(f"{r.name} {r.seconds * 1e3:.0f}" for r in report.records)
        print(f"{f}: {n} -> {g.node_count()} nodes, default pipeline {secs:.3f} s ({passes} ms)")
    if len(best) > 1:
        first, last = list(best.values())[0], list(best.values())[-1]
        print(f"ratio last/first: {last / first:.2f}x")


if __name__ == "__main__":
    main()
