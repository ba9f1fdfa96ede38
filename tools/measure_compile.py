"""Compile-time cost: export, optimize and compile a random-weight GPT-2, stage by stage.

Each stage runs in its own process, so its peak memory (max RSS) is its own:

    python tools/measure_compile.py --shape gpt2 --shape gpt2-xl --workdir /tmp/qgraph-measure

prints, per shape, the weight size, each stage's wall time and peak memory (also
as a multiple of the weights), and the time of the default pipeline alone (not
counting load and save), plus the pipeline-time ratio between the shapes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("init", "export", "optimize", "compile")


def stage(name: str, shape: str, work: Path) -> dict[str, float]:
    """Run one stage in this process; returns what it measured."""
    out: dict[str, float] = {}
    folder, raw, opt, art = work / "hf", work / "raw.onnx", work / "opt.onnx", work / "cpu"
    if name == "init":
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        from qgraph.frontend.families.gpt2 import RANDOM_SHAPES

        torch.manual_seed(0)
        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config(**RANDOM_SHAPES[shape]))
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.save_pretrained(folder)
    elif name == "export":
        from qgraph.frontend.export import export_model

        export_model(str(folder), raw, exporter="dynamo")
    elif name == "optimize":
        from qgraph.ir.graph import Graph
        from qgraph.pipeline.optimize import optimize

        g = Graph.load(raw)
        out["weight_bytes"] = g.weights_nbytes()
        t = time.perf_counter()
        report = optimize(g, ctx_len=128)
        out["pipeline_s"] = time.perf_counter() - t
        out["nodes"] = g.node_count()
        out["passes"] = {r.name: round(r.seconds, 3) for r in report.records}  # type: ignore[assignment]
        g.save(opt, external=True)
    elif name == "compile":
        from qgraph.compile import compile_model

        compile_model(opt, "cpu", art, prefill_seq_len=32, ctx_len=128)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", default=None, help="gpt2, gpt2-medium, gpt2-large, gpt2-xl (repeatable)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qgraph-measure"))
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.stage:  # the child: run one stage and print what it measured
        name, shape = args.stage.split(":")
        t = time.perf_counter()
        out = stage(name, shape, args.workdir)
        out["wall_s"] = time.perf_counter() - t
        out["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(out))
        return 0
    results: dict[str, dict[str, dict[str, float]]] = {}
    for shape in args.shape or ["gpt2"]:
        work = args.workdir / shape
        work.mkdir(parents=True, exist_ok=True)
        results[shape] = {}
        for name in STAGES:
            print(f"[{shape}] {name} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--stage", f"{name}:{shape}", "--workdir", str(work)],
                                  capture_output=True, text=True)  # fmt: skip
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[shape][name] = json.loads(proc.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for shape, r in results.items():
        wb = r["optimize"]["weight_bytes"]
        print(f"{shape}: weights {wb / 1e9:.2f} GB, default pipeline {r['optimize']['pipeline_s']:.2f} s "
              f"({r['optimize']['nodes']:.0f} nodes after)")  # fmt: skip
        for name in STAGES[1:]:
            s = r[name]
            print(f"  {name:<9} {s['wall_s']:7.1f} s   peak {s['max_rss_bytes'] / 1e9:6.2f} GB = {s['max_rss_bytes'] / wb:4.2f} x weights")
    shapes = list(results)
    if len(shapes) > 1:
        a, b = results[shapes[0]]["optimize"]["pipeline_s"], results[shapes[-1]]["optimize"]["pipeline_s"]
        print(f"pipeline time {shapes[-1]} / {shapes[0]}: {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
