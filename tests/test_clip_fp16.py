"""clip-fp16: golden mask case, no-op, infinities kept, large weights only on request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from helpers import check_case
from onnx import TensorProto, helper, numpy_helper

from passes.clip_fp16 import FP16_MAX, ClipFp16, clip_fp16_values
from qgraph.ir.graph import Graph


def test_clamps_finite_values_and_keeps_infinities() -> None:
    x = np.array([-3.4e38, -np.inf, np.inf, np.nan, 1e5, -65504.0, 1.0], np.float32)
    got = clip_fp16_values(x)
    assert got is not None and got.dtype == np.float32
    np.testing.assert_array_equal(got, [-FP16_MAX, -np.inf, np.inf, np.nan, FP16_MAX, -65504.0, 1.0])
    assert clip_fp16_values(np.array([-np.inf, 65504.0, np.nan], np.float32)) is None


def test_mask_constants_are_clipped(golden: Any) -> None:
    # Initializer (-3.4e38 and -1e5 clamp, -inf stays), a Constant tensor (1e9)
    # and a Constant value_float (3e38); the outputs do not change.
    out = check_case(ClipFp16, "mask", golden, expect_modified=True, expect_stats={"clipped": 3, "values": 4})
    (top,) = [n for n in out.nodes_by_op("Constant") if "value_float" in n.attrs]
    assert top.attrs["value_float"] == FP16_MAX


def test_values_in_range_and_other_dtypes_are_left_alone(golden: Any) -> None:
    check_case(ClipFp16, "in_range", golden, expect_modified=False)


def _weight_model(tmp_path: Path) -> Path:
    """y = x @ W with W [600, 600] float32 (1.4 MB, external), one entry 1e6."""
    w = np.zeros((600, 600), np.float32)
    w[3, 4] = 1e6
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "w",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 600])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 600])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = tmp_path / "w.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="w.data", size_threshold=0)
    return path


def test_large_weights_are_checked_only_when_asked(tmp_path: Path) -> None:
    path = _weight_model(tmp_path)
    graph = Graph.load(path)
    result = ClipFp16().run(graph)
    assert result.modified is False and result.stats == {"unchecked": 1}
    (w,) = [t for t in graph.tensors().values() if t.name == "W"]
    assert type(w._values).__name__ == "_FileValues"  # not read

    result = ClipFp16(check_weights=True).run(graph)
    assert result.modified is True and result.stats == {"clipped": 1, "values": 1}
    assert graph.const_value(w)[3, 4] == FP16_MAX
    saved = graph.save(tmp_path / "out" / "w.onnx", external=True)
    assert Graph.load(saved).const_value(Graph.load(saved).tensors()["W"]).max() == FP16_MAX
