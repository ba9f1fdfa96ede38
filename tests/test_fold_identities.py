"""fold-identities: a pinned graph's ops that static shapes make identities or constants."""

from __future__ import annotations

from typing import Any

from helpers import check_case

from passes import FoldIdentities


def test_a_decode_steps_last_position_selection_goes(golden: Any) -> None:
    out = check_case(FoldIdentities, "decode_selection", golden, expect_modified=True,
                     expect_stats={"reduce": 1, "self_compare": 1, "where_same": 1, "matmul_by_one": 1, "reshape_merged": 2})  # fmt: skip
    # The hidden state reaches Relu directly; the padding redirect keeps its Less/Where; one Reshape writes the slots.
    assert out.op_counts() == {"Relu": 1, "Less": 1, "Where": 1, "Reshape": 1}
    (relu,) = out.nodes_by_op("Relu")
    assert relu.inputs[0].name == "hidden"
    (reshape,) = out.nodes_by_op("Reshape")
    assert reshape.inputs[0] is out.nodes_by_op("Where")[0].outputs[0]


def test_a_prefill_chunk_keeps_every_node(golden: Any) -> None:
    check_case(FoldIdentities, "prefill_selection", golden, expect_modified=False)


def test_near_misses_stay(golden: Any) -> None:
    # Float self-comparison, reductions over a size-2 axis or dropping their axis, products by twos or by a
    # column of ones, Where of two tensors, a graph output, a Reshape of a Transpose, Equal of two tensors.
    check_case(FoldIdentities, "near_misses", golden, expect_modified=False)
