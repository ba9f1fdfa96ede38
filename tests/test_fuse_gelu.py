"""fuse-gelu: the tanh and erf forms in their spellings, near misses, opset 20."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import check_case, declined_reasons

from passes import FuseGelu
from qgraph.ir.graph import Graph


def fused(case: str, kind: str, golden: Any, atol: float = 1e-5) -> Graph:
    out = check_case(FuseGelu, case, golden, expect_modified=True, expect_stats={kind: 1}, atol=atol)
    assert out.opset() == 20
    (gelu,) = out.nodes_by_op("Gelu")
    assert gelu.attrs["approximate"] == ("tanh" if kind == "gelu_tanh" else "none")
    assert gelu.name.startswith("fuse-gelu/")
    return out


def declined(case: str, golden: Any) -> list[str]:
    return declined_reasons(FuseGelu, case, golden)


def test_tanh_torchscript_opset14_raises_opset_and_converts_other_nodes(golden: Any) -> None:
    out = fused("tanh_torchscript_opset14", "gelu_tanh", golden)
    assert out.op_counts() == {"Gelu": 1, "ReduceMean": 1, "Split": 1}
    (mean,) = out.nodes_by_op("ReduceMean")
    assert "axes" not in mean.attrs and out.const_value(mean.inputs[1]).tolist() == [-1]
    assert out.nodes_by_op("Split")[0].attrs["num_outputs"] == 2


@pytest.mark.parametrize(
    ("case", "kind"),
    [
        ("tanh_cube_mul_half_last", "gelu_tanh"),
        ("tanh_folded_constants", "gelu_tanh"),
        ("tanh_half_with_one", "gelu_tanh"),
        ("erf_div_torchscript", "gelu_erf"),
        ("erf_mul_half_first", "gelu_erf"),
    ],
)
def test_variants_fuse_to_one_gelu(case: str, kind: str, golden: Any) -> None:
    assert set(fused(case, kind, golden).op_counts()) == {"Gelu"}


def test_fp16_constants_match_within_their_precision(golden: Any) -> None:
    assert set(fused("tanh_fp16", "gelu_tanh", golden, atol=1e-2).op_counts()) == {"Gelu"}


def test_no_pattern_is_a_no_op(golden: Any) -> None:
    assert declined("no_pattern", golden) == [
        "the Tanh input is a Mul without a constant scalar factor, expected sqrt(2/pi)*(x + 0.044715*x^3)"
    ]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("pow2", "Pow exponent is 2, expected 3"),
        ("wrong_tanh_coefficient", "tanh coefficient 0.5 is not sqrt(2/pi)"),
        ("wrong_cubic_coefficient", "cubic coefficient 0.05 is not 0.044715"),
        ("erf_wrong_divisor", "the erf argument is x/1.5, expected x/sqrt(2)"),
        ("wrong_outer_factor", "the outer factor 0.4 is not 0.5"),
        ("half_x_used_outside", "0.5*x is also used outside the pattern"),
        ("opset12", "the graph is at opset 12; below 13 raising it would change other ops"),
    ],
)
def test_near_misses_decline_with_a_reason(case: str, reason: str, golden: Any) -> None:
    reasons = declined(case, golden)
    assert len(reasons) == 1 and reason in reasons[0], reasons
