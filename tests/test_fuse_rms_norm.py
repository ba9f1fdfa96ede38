"""fuse-rms-norm: RMSNorm variants (float32 and float16), near misses, opset 23."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import GOLDEN_DIR, check_case, declined_reasons, run_pass, session

from passes import FuseRmsNorm
from qgraph.ir.graph import Graph

FP16_ATOL = 1e-2


def fused(case: str, golden: Any, atol: float = 1e-5) -> Graph:
    out = check_case(FuseRmsNorm, case, golden, expect_modified=True, expect_stats={"rms_norm": 1}, atol=atol)
    assert out.opset() == 23
    (node,) = out.nodes_by_op("RMSNormalization")
    assert node.attrs["axis"] == -1 and node.attrs["stash_type"] == 1
    return out


def declined(case: str, golden: Any) -> list[str]:
    return declined_reasons(FuseRmsNorm, case, golden)


def test_basic_raises_opset_and_converts_other_nodes(golden: Any) -> None:
    out = fused("basic_opset17", golden)
    (split,) = out.nodes_by_op("Split")
    assert split.attrs["num_outputs"] == 2
    (mean,) = out.nodes_by_op("ReduceMean")
    assert "axes" not in mean.attrs and out.const_value(mean.inputs[1]).tolist() == [1]
    assert out.nodes_by_op("RMSNormalization")[0].attrs["epsilon"] == pytest.approx(1e-6)


def test_llama_fp16_computes_in_fp32(golden: Any) -> None:
    out = fused("llama_fp16", golden, atol=FP16_ATOL)
    casts = [n.attrs["to"] for n in out.nodes_by_op("Cast")]
    assert casts == [1, 10]  # float16 -> float32 -> RMSNormalization -> float16
    scale = out.nodes_by_op("RMSNormalization")[0].inputs[1]
    assert str(out.const_value(scale).dtype) == "float32"


def test_gemma_one_plus_weight_becomes_the_scale_in_fp32(golden: Any) -> None:
    out = fused("gemma_fp16", golden, atol=FP16_ATOL)
    scale = out.const_value(out.nodes_by_op("RMSNormalization")[0].inputs[1])
    assert str(scale.dtype) == "float32" and scale.tolist() == [1.0, 0.5, 2.0, -1.0, 1.5, 0.75, 1.25, 2.5]  # 1 + weight
    assert [n.op for n in out.nodes] == ["Cast", "RMSNormalization", "Cast"]


def test_fp16_without_casts_gets_fp32_casts(golden: Any) -> None:
    out = fused("fp16_no_casts", golden, atol=FP16_ATOL)
    assert [n.op for n in out.nodes] == ["Cast", "RMSNormalization", "Cast"]


def test_fp16_large_inputs_do_not_overflow() -> None:
    """x^2 overflows float16 for |x| > 256; the fused graph computes it in float32."""
    graph = Graph.parse((GOLDEN_DIR / "fuse-rms-norm" / "fp16_no_casts.before.onnxtxt").read_text())
    out = run_pass(FuseRmsNorm(), graph).graph
    x = np.full((2, 4, 8), 1000.0, np.float16)
    (y,) = session(out).run(None, {"x": x})
    gamma = np.array([1.0, 0.5, 2.0, -1.0, 1.5, 0.25, 0.75, 1.25], np.float16)
    np.testing.assert_allclose(y[0, 0], gamma, rtol=1e-3)


def test_no_gamma_builds_ones(golden: Any) -> None:
    out = fused("no_gamma", golden)
    scale = out.nodes_by_op("RMSNormalization")[0].inputs[1]
    assert out.const_value(scale).tolist() == [1.0] * 8


def test_no_pattern_is_a_no_op(golden: Any) -> None:
    assert declined("no_pattern", golden) == ["the Sqrt input comes from Abs, expected Add(variance, epsilon)"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("layer_norm", "the input is x - mean(x): this is a LayerNorm, left to fuse-layer-norm"),
        ("pow3", "Pow exponent is 3, expected 2"),
        ("eps_from_input", "epsilon is not a constant (it is the graph input 'eps')"),
        ("opset_blocked_by_dft", "raising opset 17 would change DFT"),
    ],
)
def test_near_misses_decline_with_a_reason(case: str, reason: str, golden: Any) -> None:
    reasons = declined(case, golden)
    assert len(reasons) == 1 and reason in reasons[0], reasons
