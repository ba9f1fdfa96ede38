"""fuse-skip-layer-norm: residual Add + LayerNormalization -> com.microsoft.SkipLayerNormalization."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import check_case, declined_reasons

from passes import FuseSkipLayerNorm


def test_pre_norm_residuals_fuse_and_the_sum_is_kept_where_it_is_read(golden: Any) -> None:
    out = check_case(FuseSkipLayerNorm, "residual_2d", golden, expect_modified=True, expect_stats={"skip_layer_norm": 2})
    assert out.op_counts() == {"SkipLayerNormalization": 2}
    first, second = out.nodes_by_op("SkipLayerNormalization")
    assert first.domain == "com.microsoft" and out.opset("com.microsoft") == 1
    assert [t.name for t in first.inputs] == ["x", "h", "g", "b"] and first.attrs["epsilon"] == pytest.approx(0.001)
    # The first sum feeds the next residual: it comes out of output 3. The second is read by its norm alone.
    assert len(first.outputs) == 4 and first.outputs[3].name == "s" and second.inputs[1] is first.outputs[3]
    assert len(second.outputs) == 1 and [t.name for t in second.inputs] == ["y", "s", "g2"]


def test_three_dimensional_rows_and_a_sum_that_is_a_graph_output(golden: Any) -> None:
    out = check_case(FuseSkipLayerNorm, "residual_3d", golden, expect_modified=True, expect_stats={"skip_layer_norm": 1})
    (node,) = out.nodes_by_op("SkipLayerNormalization")
    assert node.outputs[3] is out.outputs[1]


def test_near_misses_are_declined_with_reasons(golden: Any) -> None:
    reasons = declined_reasons(FuseSkipLayerNorm, "near_misses", golden)
    assert len(reasons) == 5, reasons
    joined = "\n".join(reasons)
    for expected in ("do not have one static shape", "not the last axis alone", "the norm's input is not an Add",
                     "also writes its mean"):  # fmt: skip
        assert expected in joined, (expected, reasons)
