"""qgraph: a graph-rewriting compiler for ONNX causal language models."""

from __future__ import annotations

from qgraph.errors import QGraphError
from qgraph.ir.graph import Graph
from qgraph.pipeline.manager import Pass, PassManager, PassRecord, PassResult, Report
from qgraph.version import __version__


def __getattr__(name: str) -> object:
    # Heavier pieces load on first use, so `import qgraph` stays light.
    if name == "AutoModelForCausalLM":
        from qgraph.api import AutoModelForCausalLM

        return AutoModelForCausalLM
    if name == "optimize":
        from qgraph.pipeline.optimize import optimize

        return optimize
    if name == "Runtime":
        from qgraph.runtime import Runtime

        return Runtime
    raise AttributeError(f"module 'qgraph' has no attribute {name!r}")


__all__ = [
    "Graph",
    "Pass",
    "PassManager",
    "PassRecord",
    "PassResult",
    "QGraphError",
    "Report",
    "AutoModelForCausalLM",
    "Runtime",
    "optimize",
    "__version__",
]
