"""fuse-layer-norm: the decomposed LayerNorm variants, near misses and opset raising."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import GOLDEN_DIR, check_case, declined_reasons

from passes import FuseLayerNorm
from qgraph.ir.graph import Graph

FP16_ATOL = 1e-2  # float16 outputs: the fused node rounds once instead of several times


def fused(case: str, golden: Any, atol: float = 1e-5) -> Graph:
    return check_case(FuseLayerNorm, case, golden, expect_modified=True, expect_stats={"layer_norm": 1}, atol=atol)


def declined(case: str, golden: Any) -> list[str]:
    return declined_reasons(FuseLayerNorm, case, golden)


def only(graph: Graph, op: str) -> Any:
    nodes = graph.nodes_by_op(op)
    assert len(nodes) == 1, f"expected one {op}, found {len(nodes)}"
    return nodes[0]


def test_basic(golden: Any) -> None:
    out = fused("basic", golden)
    assert set(out.op_counts()) == {"LayerNormalization"}
    ln = only(out, "LayerNormalization")
    assert ln.attrs["axis"] == -1 and ln.attrs["epsilon"] == pytest.approx(1e-5)
    assert ln.name == "fuse-layer-norm/0" and out.opset() == 17


def test_torchscript_opset14_constant_nodes_raises_opset(golden: Any) -> None:
    out = fused("torchscript_opset14", golden)
    assert out.opset() == 17
    assert out.op_counts() == {"Relu": 1, "LayerNormalization": 1}


def test_opset18_axes_input_and_commuted_operands(golden: Any) -> None:
    out = fused("opset18_axes_input_commuted", golden)
    assert out.opset() == 18 and only(out, "LayerNormalization").attrs["epsilon"] == pytest.approx(1e-6)


def test_reciprocal_without_beta_has_no_bias_input(golden: Any) -> None:
    ln = only(fused("reciprocal_no_beta", golden), "LayerNormalization")
    assert len(ln.inputs) == 2


def test_no_gamma_no_beta_builds_a_scale_of_ones(golden: Any) -> None:
    out = fused("no_affine", golden)
    scale = only(out, "LayerNormalization").inputs[1]
    assert out.const_value(scale).tolist() == [1.0] * 8


def test_fp16_normalized_in_fp32_fuses_to_an_fp16_node(golden: Any) -> None:
    out = fused("fp16_cast_around", golden, atol=FP16_ATOL)
    assert set(out.op_counts()) == {"LayerNormalization"}


def test_fp16_casts_around_the_statistics(golden: Any) -> None:
    out = fused("fp16_casts_around_statistics", golden, atol=FP16_ATOL)
    assert set(out.op_counts()) == {"LayerNormalization"}


def test_fp16_input_with_fp32_output_keeps_a_cast_in_front(golden: Any) -> None:
    out = fused("fp16_input_fp32_output", golden)
    assert out.op_counts() == {"Cast": 1, "LayerNormalization": 1}
    assert only(out, "Cast").attrs["to"] == 1


def test_input_of_unknown_dtype_gets_a_cast_in_front(golden: Any) -> None:
    out = fused("fp16_unknown_input_dtype", golden, atol=FP16_ATOL)
    assert out.op_counts() == {"Cos": 1, "Cast": 1, "LayerNormalization": 1}
    assert only(out, "Cast").attrs["to"] == 10


def test_no_pattern_is_a_no_op(golden: Any) -> None:
    reasons = declined("no_pattern", golden)
    assert reasons == ["the Add before Sqrt has no ReduceMean operand (expected variance + epsilon)"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("eps_from_input", "epsilon is not a constant (it is the graph input 'eps')"),
        ("pow3", "Pow exponent is 3, expected 2"),
        ("axes_not_last", "ReduceMean axes [1] are not the last axis"),
        ("mean_used_outside", "the mean is also used outside the pattern"),
        ("div_numerator_not_centered", "the tensor divided by sqrt(variance + eps) is not the centered x - mean(x) that is squared"),
        ("gamma_not_per_feature", "gamma has shape [4, 1], expected one value per normalized element"),
        ("no_affine_unknown_width", "the normalized size is unknown"),
        ("opset12", "the graph is at opset 12; below 13 raising it would change other ops"),
    ],
)
def test_near_misses_decline_with_a_reason(case: str, reason: str, golden: Any) -> None:
    reasons = declined(case, golden)
    assert len(reasons) == 1 and reason in reasons[0], reasons


def test_max_matches_limits_the_rewrites() -> None:
    text = (GOLDEN_DIR / "fuse-layer-norm" / "basic.before.onnxtxt").read_text()
    p = FuseLayerNorm(max_matches=0)
    result = p.run(Graph.parse(text))
    assert result.modified is False and result.stats == {"skipped": 1}
