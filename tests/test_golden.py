"""The golden harness: canonical form, compare, and the --update-golden flag."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from qgraph.devtools.golden import GoldenMismatch, canonical_text, compare_or_update
from qgraph.ir.graph import Graph

A = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[2, 40] x) => (float[2, 40] y) {
    eps = Constant <value = float {1e-5}> ()
    s = Add (x, eps)
    y = Relu (s)
}
"""
# The same graph with other names and an initializer instead of a Constant node.
B = """
<ir_version: 10, opset_import: ["" : 17]>
other (float[2, 40] x) => (float[2, 40] y) <float epsilon = {1e-5}> {
    sum_1 = Add (x, epsilon)
    y = Relu (sum_1)
}
"""


def test_canonical_form_ignores_names_but_not_values() -> None:
    a = Graph.parse(A)
    b = Graph.parse(B)
    assert "t0" in canonical_text(a)
    assert canonical_text(b) == canonical_text(Graph.parse(B.replace("sum_1", "zzz")))
    assert canonical_text(b) != canonical_text(Graph.parse(B.replace("1e-5", "1e-6")))
    assert canonical_text(a) != canonical_text(b)  # a Constant node is a node


def test_large_weights_become_inputs_and_the_text_still_parses() -> None:
    g = Graph.parse(A)
    w = g.constant("w", np.ones((40, 40), np.float32))
    mm = g.add_node("MatMul", [g.nodes_by_op("Relu")[0].outputs[0], w], prefix="t", after=g.nodes_by_op("Relu")[0])
    g.gs.outputs[0] = mm.outputs[0]
    mm.outputs[0].dtype, mm.outputs[0].shape = np.float32, [2, 40]
    text = canonical_text(g)
    assert "float[40,40] c0" in text.replace(", ", ",") and "1, 1, 1" not in text
    onnx.checker.check_model(onnx.parser.parse_model(text))


def test_compare_and_update(tmp_path: Path) -> None:
    path = tmp_path / "case.after.onnxtxt"
    with pytest.raises(GoldenMismatch, match="does not exist; run pytest --update-golden"):
        compare_or_update(Graph.parse(A), path, update=False)
    assert compare_or_update(Graph.parse(A), path, update=True) is True
    assert compare_or_update(Graph.parse(A), path, update=True) is False  # unchanged
    compare_or_update(Graph.parse(A), path, update=False)
    with pytest.raises(GoldenMismatch, match=r"(?s)graph differs.*\+.*Relu"):
        compare_or_update(Graph.parse(A.replace("y = Relu", "y = Sigmoid")), path, update=False)


def test_update_golden_flag_end_to_end(pytester: pytest.Pytester) -> None:
    shutil.copy(Path(__file__).parent / "conftest.py", pytester.path / "conftest.py")
    pytester.makepyfile(
        test_case=f'''
from qgraph.ir.graph import Graph
def test_g(golden):
    golden.check(Graph.parse("""{A}"""), "p/case.after.onnxtxt")
'''
    )
    assert pytester.runpytest().ret != 0  # no golden file yet
    assert pytester.runpytest("--update-golden").ret == 0
    written = next(pytester.path.rglob("case.after.onnxtxt"))
    assert "Relu" in written.read_text()
    assert pytester.runpytest().ret == 0
    written.write_text(written.read_text().replace("Relu", "Sigmoid"))
    assert pytester.runpytest().ret != 0
