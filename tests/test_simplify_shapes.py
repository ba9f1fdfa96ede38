"""simplify-shapes: layout ops that static shapes make trivial are dropped or merged."""

from __future__ import annotations

from typing import Any

from helpers import check_case

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


def test_linear_layers_keep_their_rows_two_dimensional(golden: Any) -> None:
    out = check_case(SimplifyShapes, "linear_rows", golden, expect_modified=True,
                     expect_stats={"row_regions_flattened": 1, "row_reshapes_removed": 3, "row_reshapes_added": 1})  # fmt: skip
    # Three exporter Reshapes go; one comes, to give the final MatMul (not row-wise) its [1, 2, 6].
    # The first one stays: it flattens the graph input, which nothing row-wise reads.
    reshapes = out.nodes_by_op("Reshape")
    assert [out.const_value(r.inputs[1]).tolist() for r in reshapes] == [[2, 4], [1, 2, 6]]
    (split,) = out.nodes_by_op("Split")
    assert split.attrs["axis"] == -1
    for op in ("Relu", "LayerNormalization", "Mul", "Add"):
        for node in out.nodes_by_op(op):
            assert all(len(t.shape) == 2 for t in node.outputs), f"{op} still writes {node.outputs[0].shape}"


def test_a_region_with_nothing_to_gain_is_left(golden: Any) -> None:
    check_case(SimplifyShapes, "blocked_rows", golden, expect_modified=False)


def test_a_gather_of_whole_rows_becomes_gather(golden: Any) -> None:
    out = check_case(SimplifyShapes, "gather_line", golden, expect_modified=True, expect_stats={"gather_elements_to_gather": 2})
    assert out.op_counts()["Gather"] == 2 and out.op_counts()["GatherElements"] == 1  # the batch of two lines stays
    first, second = out.nodes_by_op("Gather")
    assert first.inputs[1] is second.inputs[1] and list(first.inputs[1].shape or [4]) == [4]
