"""qgraph: a graph-rewriting compiler for ONNX causal language models."""

from __future__ import annotations

from qgraph.errors import QGraphError
from qgraph.graph import Graph
from qgraph.pass_manager import Pass, PassManager, PassRecord, PassResult, Report

__version__ = "0.1.0"

__all__ = ["Graph", "Pass", "PassManager", "PassRecord", "PassResult", "QGraphError", "Report", "__version__"]
