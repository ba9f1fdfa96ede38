"""pack-matmuls: linear layers that read one input -> one MatMul by their concatenated weights, and a Split."""

from __future__ import annotations

from typing import Any

from helpers import check_case, declined_reasons

from passes import PackMatmuls


def test_qkv_and_gate_up_are_packed_and_lone_projections_stay(golden: Any) -> None:
    out = check_case(PackMatmuls, "llama_layer", golden, expect_modified=True, expect_stats={"packed": 2, "matmuls": 5})
    assert out.op_counts()["MatMul"] == 4 and out.op_counts()["Split"] == 2  # q/k/v, gate/up packed; o and down alone
    qkv, gate_up = out.nodes_by_op("Split")
    assert [t.name for t in qkv.outputs] == ["q", "k", "v0"] and out.const_value(qkv.inputs[1]).tolist() == [8, 4, 4]
    assert [t.name for t in gate_up.outputs] == ["g", "u"] and out.const_value(gate_up.inputs[1]).tolist() == [6, 6]
    packed = out.producer(qkv.inputs[0])
    assert packed.op == "MatMul" and packed.inputs[0].name == "x" and out.const_value(packed.inputs[1]).shape == (8, 16)


def test_a_concat_of_the_parts_in_order_is_the_packed_product(golden: Any) -> None:
    """fuse-attention-rotary feeds the attention Concat(q, k, v): packed, that is the packed product itself, no Split."""
    out = check_case(PackMatmuls, "concat_of_parts", golden, expect_modified=True,
                     expect_stats={"packed": 2, "matmuls": 5, "concat_dropped": 1})  # fmt: skip
    assert out.op_counts() == {"MatMul": 2, "Split": 1, "Concat": 1, "Relu": 1}  # the out-of-order pair keeps its Split, Concat
    (relu,) = out.nodes_by_op("Relu")
    assert out.producer(relu.inputs[0]).op == "MatMul"


def test_products_that_are_not_linear_layers_are_near_misses(golden: Any) -> None:
    assert declined_reasons(PackMatmuls, "near_misses", golden) == [
        "the weight 'w_in' is a graph input, not a constant",
        "the weight 'rt' is computed at run time",
        "the weight 'W3' has shape [2, 8, 4], not 2-D",
    ]
