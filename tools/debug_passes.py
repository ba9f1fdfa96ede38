#!/usr/bin/env python
"""Debug a pass pipeline on an ONNX file: dumps per pass, numerical bisection, near misses.

    python tools/debug_passes.py IN.onnx [--passes a,b,...] [--pass-module FILE.py ...]
        [--ctx-len C] [--batch-size B] [--seq-len S] [--out DIR] [--atol X] [--json]

Writes ``DIR/NNN_<pass>.onnxtxt`` (ONNX text without weights) and
``DIR/NNN_<pass>.json`` after every pass, compares each stage's logits with the
input graph's on fixed inputs, names the first pass that exceeds ``--atol``
(and, inside it, the match site that breaks the numbers), and lists the near
misses of the fusions. The logic is :mod:`qgraph.devtools.debug`; this is its command
line. ``--json`` prints one JSON object on stdout; progress goes to stderr.
Exit status: 0 when the report was made (whether or not a pass is bad), 2 for
an error a user can cause (printed as one line).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

# Run from a checkout without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qgraph.cli import CTX_HELP  # noqa: E402
from qgraph.errors import QGraphError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="debug_passes.py", description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path, metavar="IN.onnx", help="ONNX file (a raw export, a retained-state graph, or any graph)")
    p.add_argument("--passes", default=None, help="comma-separated pass names (default: the default pipeline)")
    p.add_argument("--pass-module", action="append", default=[], type=Path, metavar="FILE.py",
                   help="load qgraph.Pass subclasses from a Python file, to name in --passes (repeatable)")  # fmt: skip
    p.add_argument("--ctx-len", type=int, default=None, help=CTX_HELP)
    p.add_argument("--batch-size", type=int, default=None, help="pin the batch size (with --seq-len); also the inputs' batch")
    p.add_argument("--seq-len", type=int, default=None, help="pin the sequence length (with --batch-size)")
    p.add_argument("--out", type=Path, default=Path("debug_passes_out"), help="dump folder (default debug_passes_out/)")
    p.add_argument("--atol", type=float, default=1e-3, help="largest allowed |logits - reference| (default 1e-3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--no-bisect", action="store_true", help="do not bisect the first bad pass over its match sites")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    try:
        from qgraph.devtools.debug import debug_passes

        report = debug_passes(
            args.input, passes, pass_modules=args.pass_module, ctx_len=args.ctx_len, batch_size=args.batch_size,
            seq_len=args.seq_len, out_dir=args.out, atol=args.atol, bisect=not args.no_bisect, threads=args.threads,
            progress=lambda msg: print(f"[debug_passes] {msg}", file=sys.stderr, flush=True),
        )  # fmt: skip
    except QGraphError as e:
        if args.debug:
            raise
        print(f"debug_passes: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("debug_passes: interrupted", file=sys.stderr)
        return 130
    print(report.to_json() if args.json else report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
