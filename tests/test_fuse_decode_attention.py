"""fuse-decode-attention: ScatterND cache writes + MultiHeadAttention at one token -> GroupQueryAttention."""

from __future__ import annotations

from typing import Any

import numpy as np
from helpers import GOLDEN_DIR, check_case, declined_reasons, run_pass, run_shared_state, session

from passes import FuseDecodeAttention
from qgraph.ir.graph import Graph

CASES = GOLDEN_DIR / "fuse-decode-attention"


def _feeds(graph: Graph, positions: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for t in graph.inputs:
        if t.name == "position_ids":
            feeds[t.name] = np.array(positions, np.int64).reshape(t.shape)
        elif t.name == "input_ids":
            feeds[t.name] = rng.integers(0, 3, t.shape).astype(np.int64)
        else:
            feeds[t.name] = rng.standard_normal(t.shape).astype(np.float32)
    return feeds


def _before_and_after(case: str) -> tuple[Graph, Graph]:
    text = (CASES / f"{case}.before.onnxtxt").read_text()
    return Graph.parse(text), run_pass(FuseDecodeAttention(), Graph.parse(text)).graph


def test_a_gpt2_layer_reads_its_packed_projection_and_writes_the_cache_in_place(golden: Any) -> None:
    out = check_case(FuseDecodeAttention, "gpt2_decode", golden, expect_modified=True, expect_stats={"decode_attention": 1},
                     shared_state=True)  # fmt: skip
    assert out.op_counts()["GroupQueryAttention"] == 1
    assert not {"ScatterND", "MultiHeadAttention", "Split", "LessOrEqual"} & set(out.op_counts())
    (gqa,) = out.nodes_by_op("GroupQueryAttention")
    assert gqa.domain == "com.microsoft" and gqa.attrs["num_heads"] == gqa.attrs["kv_num_heads"] == 2
    assert gqa.inputs[0].name == "qkv" and [t.name for t in gqa.inputs[1:5]] == ["", "", "past_key.0", "past_value.0"]
    assert [t.name for t in gqa.outputs] == ["y", "past_key.0_RetainedState", "past_value.0_RetainedState"]
    assert out.producer(gqa.inputs[5]).attrs["to"] == 6 and out.scalar(gqa.inputs[6]) == 8  # int32 slots; 8-slot cache


def test_separate_projections_are_packed_and_rows_keep_their_own_slots(golden: Any) -> None:
    out = check_case(FuseDecodeAttention, "toy_decode", golden, expect_modified=True, expect_stats={"decode_attention": 1},
                     shared_state=True)  # fmt: skip
    (gqa,) = out.nodes_by_op("GroupQueryAttention")
    assert out.producer(gqa.inputs[0]).op == "Concat"


def test_near_misses_are_declined_with_reasons(golden: Any) -> None:
    reasons = declined_reasons(FuseDecodeAttention, "near_misses", golden)
    assert len(reasons) == 5, reasons
    joined = "\n".join(reasons)
    for expected in ("not shown to be the position the mask uses", "read by its ScatterND alone",
                     "written at different indices", "read by this attention alone", "not a multiple of 8"):  # fmt: skip
        assert expected in joined, (expected, reasons)


def test_a_padding_row_writes_the_same_slot_and_valid_rows_are_unchanged() -> None:
    before, after = _before_and_after("toy_decode")
    feeds = _feeds(before, [5, -1])  # row 1 is padding: retain-kv-cache sends it to the last slot
    ref = dict(zip([o.name for o in before.outputs], session(before).run(None, feeds)))
    got = dict(zip([o.name for o in after.outputs], run_shared_state(session(after), feeds)))
    for name in ("past_key.0_RetainedState", "past_value.0_RetainedState"):
        np.testing.assert_allclose(got[name], ref[name], atol=1e-6)
    np.testing.assert_allclose(got["logits"][0], ref["logits"][0], atol=1e-5)


def test_without_shared_buffers_the_slots_up_to_the_step_are_right() -> None:
    before, after = _before_and_after("gpt2_decode")
    feeds = _feeds(before, [3])
    ref = dict(zip([o.name for o in before.outputs], session(before).run(None, feeds)))
    got = dict(zip([o.name for o in after.outputs], session(after).run(None, feeds)))
    np.testing.assert_allclose(got["y"], ref["y"], atol=1e-5)
    for name in ("past_key.0_RetainedState", "past_value.0_RetainedState"):
        np.testing.assert_allclose(got[name][:, :, :4], ref[name][:, :, :4], atol=1e-6)  # slots 0..3; later ones undefined


def _both_refuse(case: str, positions: list[int]) -> None:
    """The graph before and after the pass both fail on ``positions`` (past the 8-slot cache)."""
    before, after = _before_and_after(case)
    feeds = _feeds(before, positions)
    for graph in (before, after):
        try:
            run_shared_state(session(graph), feeds)
        except Exception as e:  # ONNX Runtime's own error: ScatterND's index or GroupQueryAttention's seqlens_k
            assert "out of" in str(e) or "invalid" in str(e).lower(), e
        else:
            raise AssertionError(f"{graph.name} ran with positions {positions} in an 8-slot cache")


def test_a_slot_past_the_cache_fails_as_the_scatter_did() -> None:
    _both_refuse("gpt2_decode", [8])


# -- a chunk of a prompt (prefill): one row, consecutive positions from a multiple of S, as the runtime feeds them


def test_a_prompt_chunk_becomes_group_query_attention_after_the_chunks_before_it(golden: Any) -> None:
    second_chunk = {"position_ids": np.array([[4, 5, 6, 7]], np.int64)}  # slots 0..3 hold the first chunk
    out = check_case(FuseDecodeAttention, "gpt2_prefill", golden, expect_modified=True, expect_stats={"decode_attention": 1},
                     shared_state=True, feeds=second_chunk)  # fmt: skip
    assert not {"ScatterND", "MultiHeadAttention", "Split", "Transpose", "LessOrEqual", "ArgMax"} & set(out.op_counts())
    (gqa,) = out.nodes_by_op("GroupQueryAttention")
    assert gqa.inputs[0].name == "qkv" and out.scalar(gqa.inputs[6]) == 8
    # seqlens_k: the chunk's first position + 3, the last slot it writes
    cast = out.producer(gqa.inputs[5])
    add = out.producer(out.producer(cast.inputs[0]).inputs[0])
    assert add.op == "Add" and out.scalar(add.inputs[1]) == 3
    gather = out.producer(add.inputs[0])
    assert gather.op == "Gather" and gather.inputs[0].name == "position_ids" and out.scalar(gather.inputs[1]) == 0


def test_the_first_chunk_and_a_padded_last_chunk_match_on_every_valid_token() -> None:
    before, after = _before_and_after("gpt2_prefill")
    for positions, valid in (([0, 1, 2, 3], 4), ([4, 5, -1, -1], 2), ([0, -1, -1, -1], 1)):
        feeds = _feeds(before, positions, seed=valid)
        ref = dict(zip([o.name for o in before.outputs], session(before).run(None, feeds)))
        got = dict(zip([o.name for o in after.outputs], run_shared_state(session(after), feeds)))
        np.testing.assert_allclose(got["y"][:, :valid], ref["y"][:, :valid], atol=1e-5)
        last = positions[valid - 1]
        for name in ("past_key.0_RetainedState", "past_value.0_RetainedState"):
            # Slots up to the last valid position; padding tokens land after it, where no step reads before writing.
            np.testing.assert_allclose(got[name][:, :, : last + 1], ref[name][:, :, : last + 1], atol=1e-6)


def test_a_chunk_past_the_cache_fails() -> None:
    _both_refuse("gpt2_prefill", [6, 7, 8, 9])  # only a driver that ignores the chunk contract sends this


def test_prompt_chunks_that_are_not_the_runtimes_are_declined(golden: Any) -> None:
    reasons = declined_reasons(FuseDecodeAttention, "prefill_near_misses", golden)
    assert len(reasons) == 3, reasons
    joined = "\n".join(reasons)
    for expected in ("2 query tokens in 2 rows", "not a whole number of 4-token chunks", "not shown to keep every valid token in place"):
        assert expected in joined, (expected, reasons)


# -- grouped KV heads: the cache holds KV heads and the attention reads them repeated (Unsqueeze, Expand, Reshape)


def test_grouped_kv_heads_become_kv_num_heads_and_keys_computed_per_head_are_merged(golden: Any) -> None:
    out = check_case(FuseDecodeAttention, "gqa_decode", golden, expect_modified=True, expect_stats={"decode_attention": 1},
                     shared_state=True, feeds={"position_ids": np.array([[5], [2]], np.int64)})  # fmt: skip
    assert not {"ScatterND", "MultiHeadAttention", "Expand", "LessOrEqual"} & set(out.op_counts())
    (gqa,) = out.nodes_by_op("GroupQueryAttention")
    assert (gqa.attrs["num_heads"], gqa.attrs["kv_num_heads"]) == (4, 2)
    # Packed: the query, the keys (merged back to [B, 1, KV * H]) and the values as they were projected
    concat = out.producer(gqa.inputs[0])
    assert concat.op == "Concat" and [t.name for t in gqa.inputs[1:5]] == ["", "", "past_key.0", "past_value.0"]
    assert concat.inputs[0].name == "q" and out.producer(concat.inputs[1]).op == "Reshape" and concat.inputs[2].name == "v"


def test_a_grouped_prompt_chunk_becomes_group_query_attention(golden: Any) -> None:
    second_chunk = {"position_ids": np.array([[4, 5, 6, 7]], np.int64)}
    out = check_case(FuseDecodeAttention, "gqa_prefill", golden, expect_modified=True, expect_stats={"decode_attention": 1},
                     shared_state=True, feeds=second_chunk)  # fmt: skip
    (gqa,) = out.nodes_by_op("GroupQueryAttention")
    assert (gqa.attrs["num_heads"], gqa.attrs["kv_num_heads"]) == (4, 1) and "Expand" not in out.op_counts()
    before, after = _before_and_after("gqa_prefill")
    for positions, valid in (([0, 1, 2, 3], 4), ([4, 5, -1, -1], 2)):
        feeds = _feeds(before, positions, seed=valid)
        ref = dict(zip([o.name for o in before.outputs], session(before).run(None, feeds)))
        got = dict(zip([o.name for o in after.outputs], run_shared_state(session(after), feeds)))
        np.testing.assert_allclose(got["y"][:, :valid], ref["y"][:, :valid], atol=1e-5)
        for name in ("past_key.0_RetainedState", "past_value.0_RetainedState"):
            np.testing.assert_allclose(got[name][:, :, : positions[valid - 1] + 1], ref[name][:, :, : positions[valid - 1] + 1], atol=1e-6)


def test_a_repeat_read_outside_the_attention_is_declined() -> None:
    text = (CASES / "gqa_decode.before.onnxtxt").read_text()
    text = text.replace("=> (float[2,1,32] y,", "=> (float[2,1,32] y, float[2,4,8,8] kh,")
    p = FuseDecodeAttention()
    assert p.run(Graph.parse(text)).modified is False
    assert "the repeat of the KV heads is read outside the attention" in p.near_misses[0].reason
