"""fuse-attention: the dynamo and TorchScript spellings, biases, near misses with reasons."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import check_case, declined_reasons

from passes import FuseAttention
from qgraph.ir.graph import Graph


def fused(case: str, golden: Any) -> Graph:
    out = check_case(FuseAttention, case, golden, expect_modified=True, expect_stats={"attention": 1}, atol=1e-5)
    (mha,) = out.nodes_by_op("MultiHeadAttention")
    assert mha.domain == "com.microsoft" and out.opset("com.microsoft") == 1
    assert "Softmax" not in out.op_counts()
    return out


def declined(case: str, golden: Any) -> list[str]:
    return declined_reasons(FuseAttention, case, golden)


def test_dynamo_decode_reads_the_unsplit_query_and_writes_the_merged_output(golden: Any) -> None:
    out = fused("dynamo_decode", golden)
    (mha,) = out.nodes_by_op("MultiHeadAttention")
    assert mha.inputs[0].name == "q_in"  # the head split is undone, not redone
    assert mha.attrs["num_heads"] == 2
    assert mha.attrs["scale"] == pytest.approx(0.7598357**2)  # sqrt(scale) on Q times sqrt(scale) on K^T
    assert out.op_counts() == {"MultiHeadAttention": 1, "Reshape": 1}  # only the final [1, 6] reshape remains


def test_torchscript_prefill_restores_the_heads_layout_for_a_graph_output(golden: Any) -> None:
    out = fused("torchscript_prefill", golden)
    (mha,) = out.nodes_by_op("MultiHeadAttention")
    assert mha.attrs["scale"] == pytest.approx(0.5)
    assert out.outputs[0].name == "y" and out.producer(out.outputs[0]).op == "Transpose"


def test_no_bias_and_a_rank_2_bias(golden: Any) -> None:
    out = fused("no_bias", golden)
    assert len(out.nodes_by_op("MultiHeadAttention")[0].inputs) == 3
    out = fused("bias_rank2", golden)
    mha = out.nodes_by_op("MultiHeadAttention")[0]
    reshape = out.producer(mha.inputs[5])  # the [S, L] mask, reshaped to 4-D
    assert reshape.op == "Reshape" and reshape.inputs[0].name == "mask" and out.const_value(reshape.inputs[1]).tolist() == [1, 1, 3, 3]


@pytest.mark.parametrize(
    "case,reason",
    [
        ("softmax_axis2", "the Softmax is over axis 2, not the last"),
        ("bias_one_row", "the bias [1, 1, 1, 3] does not broadcast as [B or 1, N or 1, S, L] = [1 or 1, 2 or 1, 3, 3]"),
        ("scores_used_outside", "the scores MatMul is a graph output"),
        ("fp16", "Q is float16; MultiHeadAttention on CPU is float32"),
        ("key_wrong_perm", "the key is transposed with perm [1, 0, 3, 2], not [0, 1, 3, 2]"),
        ("no_pattern", "the Softmax input has rank 2, not 4 ([B, N, S, L])"),
    ],
)
def test_near_misses_decline_with_a_reason(case: str, reason: str, golden: Any) -> None:
    assert declined(case, golden) == [reason]


def test_a_bias_computed_from_the_scores_is_declined() -> None:
    g = Graph.parse("""<ir_version: 10, opset_import: ["" : 18]>
scores_plus_scores (float[1,2,3,4] q, float[1,2,3,4] k, float[1,2,3,4] v) => (float[1,2,3,4] y)
{
    kt = Transpose <perm = [0, 1, 3, 2]> (k)
    scores = MatMul (q, kt)
    doubled = Add (scores, scores)
    p = Softmax <axis = -1> (doubled)
    y = MatMul (p, v)
}""")
    p = FuseAttention()
    assert not p.run(g).modified
    assert [m.reason for m in p.near_misses] == ["the bias is computed inside the attention pattern"]


# -- the standard ONNX Attention op (opset 23): the same MultiHeadAttention, where it computes the same


def test_onnx_attention_op_at_decode_reads_the_unsplit_query_and_writes_the_merged_output(golden: Any) -> None:
    out = fused("onnx_attention_decode", golden)
    (mha,) = out.nodes_by_op("MultiHeadAttention")
    assert mha.inputs[0].name == "q_in" and mha.inputs[5].name == "mask"
    assert mha.attrs["num_heads"] == 2 and mha.attrs["scale"] == pytest.approx(0.25)
    assert out.op_counts() == {"MultiHeadAttention": 1, "Reshape": 1}


def test_onnx_attention_op_default_scale_and_heads_layout_restored(golden: Any) -> None:
    out = fused("onnx_attention_default_scale", golden)
    (mha,) = out.nodes_by_op("MultiHeadAttention")
    assert len(mha.inputs) == 3 and mha.attrs["scale"] == pytest.approx(0.5)  # 1/sqrt(4)
    assert out.producer(out.outputs[0]).op == "Transpose"


def test_onnx_attention_op_with_grouped_kv_heads_reads_them_repeated(golden: Any) -> None:
    out = fused("onnx_attention_gqa", golden)
    (mha,) = out.nodes_by_op("MultiHeadAttention")
    assert mha.attrs["num_heads"] == 4
    for t in mha.inputs[1:3]:  # query head j reads K/V head j // 2
        reshape = out.producer(t)
        expand = out.producer(reshape.inputs[0])
        assert (reshape.op, expand.op, out.producer(expand.inputs[0]).op) == ("Reshape", "Expand", "Unsqueeze")
        assert out.const_value(reshape.inputs[1]).tolist() == [1, 4, 5, 8]


def test_onnx_attention_op_near_misses_decline_with_a_reason(golden: Any) -> None:
    assert declined("onnx_attention_near_misses", golden) == [
        "the Attention mask is bool; MultiHeadAttention takes an additive float bias",
        "the Attention has softcap 30.0, which MultiHeadAttention does not apply",
        "the Attention is causal (is_causal=1), which MultiHeadAttention does not compute the same way",
        "Q is float16; MultiHeadAttention on CPU is float32",
        "the Attention takes its own past key/value or uses its present or scores outputs",
    ]
