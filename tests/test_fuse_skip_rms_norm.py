"""fuse-skip-rms-norm: residual Add + RMSNormalization -> com.microsoft.SkipSimplifiedLayerNormalization."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import check_case, declined_reasons

from passes import FuseSkipRmsNorm


def test_pre_norm_residuals_fuse_and_the_sum_is_kept_where_it_is_read(golden: Any) -> None:
    out = check_case(FuseSkipRmsNorm, "residual_2d", golden, expect_modified=True, expect_stats={"skip_rms_norm": 2})
    assert out.op_counts() == {"SkipSimplifiedLayerNormalization": 2}
    first, second = out.nodes_by_op("SkipSimplifiedLayerNormalization")
    assert first.domain == "com.microsoft" and out.opset("com.microsoft") == 1
    assert [t.name for t in first.inputs] == ["x", "h", "g"] and first.attrs["epsilon"] == pytest.approx(0.001)
    # The first sum feeds the next residual: it comes out of output 3. The second is read by its norm alone.
    assert len(first.outputs) == 4 and first.outputs[3].name == "s" and second.inputs[1] is first.outputs[3]
    assert len(second.outputs) == 1 and [t.name for t in second.inputs] == ["y", "s", "g2"]
    assert second.attrs["epsilon"] == pytest.approx(1e-5)  # RMSNormalization's default


def test_a_cast_to_float32_of_the_sum_goes_with_it(golden: Any) -> None:
    out = check_case(FuseSkipRmsNorm, "cast_between", golden, expect_modified=True, expect_stats={"skip_rms_norm": 1})
    assert out.op_counts() == {"SkipSimplifiedLayerNormalization": 1, "Add": 1}
    (node,) = out.nodes_by_op("SkipSimplifiedLayerNormalization")
    assert node.outputs[3].name == "s"  # the sum itself (the next residual reads it), not the Cast's copy


def test_near_misses_are_declined_with_reasons(golden: Any) -> None:
    reasons = declined_reasons(FuseSkipRmsNorm, "near_misses", golden)
    assert len(reasons) == 3, reasons
    joined = "\n".join(reasons)
    for expected in ("do not have one static shape", "not the last axis alone", "the norm's input is not an Add"):
        assert expected in joined, (expected, reasons)


def test_the_cpu_target_runs_it_and_not_the_layer_norm_form() -> None:
    from qgraph.targets import get_target

    final = get_target("cpu").slots["final"]
    assert "fuse-skip-rms-norm" in final and "fuse-skip-layer-norm" not in final
