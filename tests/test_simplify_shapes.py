"""simplify-shapes: layout ops that static shapes make trivial are dropped or merged."""

from __future__ import annotations

from typing import Any

from passcheck import check_case

from passes import SimplifyShapes


def test_one_tokens_heads_become_one_reshape_and_the_gather_goes(golden: Any) -> None:
    out = check_case(SimplifyShapes, "decode_heads", golden, expect_modified=True,
                     expect_stats={"gather_elements": 1, "transpose_to_reshape": 1, "reshape_merged": 1})  # fmt: skip
    assert out.op_counts() == {"Reshape": 1, "ScatterND": 1}
    (reshape,) = out.nodes_by_op("Reshape")
    assert reshape.inputs[0].name == "x" and out.const_value(reshape.inputs[1]).tolist() == [1, 2, 1, 3]


def test_reshape_chains_merge_and_no_op_reshapes_go(golden: Any) -> None:
    out = check_case(SimplifyShapes, "noop_reshape", golden, expect_modified=True)
    # Reshape(x, [2, 3]) goes; the chain [1, 2, 3] -> [3, 2] -> [2, 3] ends where it began, so it goes too,
    # except the last Reshape, which writes the graph output.
    assert out.op_counts() == {"Relu": 1, "Reshape": 1}


def test_real_transposes_and_gathers_stay(golden: Any) -> None:
    check_case(SimplifyShapes, "real_transpose", golden, expect_modified=False)
