"""Debugging passes: stage dumps, numerical bisection, near misses.

The model is TVM's pass instruments (dump the IR after every pass as
``NNN_<pass>``) and onnxscript's rewriter tracer (say why a rule did not
fire). :func:`debug_passes` runs a pipeline one pass at a time and, after
each pass:

* writes ``DIR/NNN_<pass>.onnxtxt`` (ONNX text with names kept; weights left
  out: large initializers and Constant nodes become typed graph inputs) and
  ``DIR/NNN_<pass>.json`` (what changed, by op type, and the pass's stats);
* runs the graph on ONNX Runtime's CPU provider with fixed inputs and compares
  its logits with the input graph's (the reference): the largest absolute
  difference and whether the top-1 token agrees;
* collects the pass's near misses (``near_misses``: candidates declined, with
  the reason the check gave).

The first pass whose difference exceeds ``atol`` (or whose graph no longer
runs) is the first bad pass. If it supports ``max_matches``
(:attr:`qgraph.Pass.supports_max_matches`), it is re-run on a copy of its input
graph with only its first k match sites, and a binary search over k names the
site whose rewrite breaks the numbers.

The parts: :mod:`.third_party` (loading a file's passes), :mod:`.dumps`
(weightless ONNX text, what changed), :mod:`.inputs` (a graph's signature and
the fixed inputs), :mod:`.execute` (running a graph on them and comparing),
:mod:`.report` (what was found) and :mod:`.driver` (the pass loop and the
bisection).
"""

from __future__ import annotations

from qgraph.devtools.debug.driver import debug_passes
from qgraph.devtools.debug.inputs import fixed_inputs, signature
from qgraph.devtools.debug.report import Bisection, DebugReport, StageRecord
from qgraph.devtools.debug.third_party import load_pass_module

__all__ = ["Bisection", "DebugReport", "StageRecord", "debug_passes", "fixed_inputs", "load_pass_module", "signature"]
