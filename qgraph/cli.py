"""The ``qgraph`` command line.

Each subcommand is a small function over the Python API. Errors a user can
cause (:class:`qgraph.errors.QGraphError`) print as one line on stderr and exit
non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from qgraph.errors import QGraphError


def _progress(msg: str) -> None:
    print(f"[qgraph] {msg}", file=sys.stderr, flush=True)


def cmd_export(args: argparse.Namespace) -> int:
    from qgraph.export import export_model
    from qgraph.inspect import human_bytes

    res = export_model(args.model, args.output, exporter=args.exporter, opset=args.opset, progress=_progress)
    print(f"wrote {res.path} ({human_bytes(res.size_bytes)}, {res.exporter} exporter, opset {res.opset}, {res.seconds:.1f} s)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from qgraph.graph import Graph
    from qgraph.inspect import format_summary, summarize

    summary = summarize(Graph.load(args.file))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qgraph", description="A graph-rewriting compiler for ONNX causal LMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-v", "--verbose", action="store_true", help="log one line per pass")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("export", help="export a Hugging Face GPT-2 to plain ONNX (no rewriting)")
    p.add_argument("model", nargs="?", default="tiny-gpt2", help="hub id, local Hugging Face folder, or tiny-gpt2 (default)")
    p.add_argument("-o", "--output", type=Path, default=Path("model.onnx"), help="output ONNX file (default model.onnx)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="show an ONNX file's inputs, outputs, opsets, ops and weight size")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except QGraphError as e:
        if args.debug:
            raise
        print(f"qgraph {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("qgraph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
