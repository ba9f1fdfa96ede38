"""legalize-qnn-layout: the head merge at one token that QNN HTP miscomputes when the batch size equals the head
count gets the exporters' Transpose back; every other Reshape stays (its HTP check is in tests/test_qnn.py)."""

from __future__ import annotations

from typing import Any

from helpers import check_case

from passes import LegalizeQnnLayout


def test_a_square_head_merge_read_by_a_matmul_gets_its_transpose(golden: Any) -> None:
    out = check_case(LegalizeQnnLayout, "square_head_merge", golden, expect_modified=True, expect_stats={"head_merges_transposed": 1})
    (transpose,) = out.nodes_by_op("Transpose")
    assert transpose.attrs["perm"] == [0, 2, 1, 3] and transpose.inputs[0].name == "attn"
    assert list(transpose.outputs[0].shape) == [2, 1, 2, 4]
    assert out.nodes_by_op("Reshape")[0].inputs[0] is transpose.outputs[0]


def test_other_reshapes_stay(golden: Any) -> None:
    # B != H; two tokens; read by an Add; batch 1; a merge to 2-D rows: each measured right on the HTP, or no merge.
    check_case(LegalizeQnnLayout, "near_misses", golden, expect_modified=False)
