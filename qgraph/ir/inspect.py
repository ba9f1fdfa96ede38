"""``qgraph inspect``: what an ONNX file holds, without loading its weights."""

from __future__ import annotations

from typing import Any

from qgraph.ir.files import human_bytes
from qgraph.ir.graph import Graph


def _dims(t: Any) -> list[int | str | None]:
    if t.shape is None:
        return []
    return [d if isinstance(d, (int, str)) else None for d in t.shape]


def _dtype(t: Any) -> str:
    if t.dtype is None:
        return "?"
    try:
        import numpy as np

        return str(np.dtype(t.dtype))
    except TypeError:
        return str(t.dtype)


def summarize(graph: Graph) -> dict[str, Any]:
    """Inputs/outputs with dims, opsets, op histogram, symbolic dims, weight size."""
    ios = {
        kind: [{"name": t.name, "dtype": _dtype(t), "shape": _dims(t)} for t in tensors]
        for kind, tensors in (("inputs", graph.inputs), ("outputs", graph.outputs))
    }
    symbolic: dict[str, list[str]] = {}
    for kind in ("inputs", "outputs"):
        for io in ios[kind]:
            for d in io["shape"]:
                if not isinstance(d, int):
                    symbolic.setdefault(str(d), []).append(io["name"])
    opsets = {"ai.onnx": graph.opset("")}
    for d in graph.gs.import_domains or []:
        if d.domain not in ("", "ai.onnx"):
            opsets[d.domain] = int(d.version)
    ops = dict(sorted(graph.op_counts().items(), key=lambda kv: (-kv[1], kv[0])))
    return {
        "graph": graph.name,
        **ios,
        "opsets": opsets,
        "nodes": graph.node_count(),
        "ops": ops,
        "symbolic_dims": symbolic,
        "weights_bytes": graph.weights_nbytes(),
    }


def _fmt_shape(shape: list[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"graph {s['graph'] or '(unnamed)'}: {s['nodes']} nodes, weights {human_bytes(s['weights_bytes'])}"]
    lines.append("opsets: " + ", ".join(f"{k} {v}" for k, v in s["opsets"].items()))
    for kind in ("inputs", "outputs"):
        lines.append(f"{kind}:")
        width = max((len(io["name"]) for io in s[kind]), default=0)
        for io in s[kind]:
            lines.append(f"  {io['name'].ljust(width)}  {io['dtype']:<8} {_fmt_shape(io['shape'])}")
    if s["symbolic_dims"]:
        lines.append("symbolic dims: " + ", ".join(f"{d} ({len(v)} tensors)" for d, v in s["symbolic_dims"].items()))
    else:
        lines.append("symbolic dims: none (fully static)")
    lines.append("ops: " + ", ".join(f"{op} {n}" for op, n in s["ops"].items()))
    return "\n".join(lines)
