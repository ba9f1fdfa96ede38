"""fuse-attention-rotary: a decode step's RotaryEmbedding(q), RotaryEmbedding(k) -> GroupQueryAttention's do_rotary."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import GOLDEN_DIR, check_case, run_pass, run_shared_state, session

from passes import FuseAttentionRotary
from qgraph.ir.graph import Graph

CASES = GOLDEN_DIR / "fuse-attention-rotary"


def decode_step(h: int) -> str:
    """Two rows' decode step of 4 query and 2 KV heads of ``h`` channels over an 8-slot cache, as fuse-rotary and
    fuse-decode-attention leave it: q, k and v split from one product, q and k rotated, packed again for the attention;
    the slot is retain-kv-cache's padding chain around the positions (the golden case is ``decode_step(16)``)."""
    angles = np.arange(8)[:, None] * 10000.0 ** (-np.arange(0, h, 2) / h)[None]
    cos, sin = (",".join(f"{x:.6g}" for x in f(angles).reshape(-1)) for f in (np.cos, np.sin))
    q, kv = 4 * h, 2 * h
    return f"""<
   ir_version: 10,
   opset_import: ["" : 23, "com.microsoft" : 1]
>
packed_decode (float[2,1,{q + 2 * kv}] qkv, int64[2,1] position_ids, float[2,2,8,{h}] "past_key.0", float[2,2,8,{h}] "past_value.0") => (float[2,1,{q}] y, float[2,2,8,{h}] "past_key.0_RetainedState", float[2,2,8,{h}] "past_value.0_RetainedState")
   <int64 zero = {{0}}, int64[1] one = {{1}}, int64 last = {{7}}, int64[1] rows = {{2}}, int32 total = {{8}}, int64[3] widths = {{{q},{kv},{kv}}}, float[8,{h // 2}] cos = {{{cos}}}, float[8,{h // 2}] sin = {{{sin}}}>
{{
   valid = GreaterOrEqual (position_ids, zero)
   top = ReduceMax <keepdims: int = 1> (position_ids, one)
   p = Where (valid, position_ids, top)
   pad = Less (p, zero)
   slot = Where (pad, last, p)
   rowslot = Reshape (slot, rows)
   seqlens = Cast <to: int = 6> (rowslot)
   q, k, v = Split <axis: int = -1> (qkv, widths)
   pos = Max (position_ids, zero)
   qr = RotaryEmbedding <interleaved: int = 0, num_heads: int = 4> (q, cos, sin, pos)
   kr = RotaryEmbedding <interleaved: int = 0, num_heads: int = 2> (k, cos, sin, pos)
   packed = Concat <axis: int = -1> (qr, kr, v)
   y, "past_key.0_RetainedState", "past_value.0_RetainedState" = com.microsoft.GroupQueryAttention <kv_num_heads: int = 2, num_heads: int = 4, scale: float = 0.25> (packed, "", "", "past_key.0", "past_value.0", seqlens, total)
}}
"""


PACKED = decode_step(16)
#: q, k and v as three inputs instead of one packed product's Split.
SEPARATE = PACKED.replace("float[2,1,128] qkv,", "float[2,1,64] q, float[2,1,32] k, float[2,1,32] v,").replace(
    "   q, k, v = Split <axis: int = -1> (qkv, widths)\n", ""
)


def test_the_golden_case_is_the_decode_step_described() -> None:
    assert (CASES / "packed_decode.before.onnxtxt").read_text() == PACKED


def _feeds(graph: Graph, positions: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in graph.inputs if t.name != "position_ids"}
    return feeds | {"position_ids": np.array(positions, np.int64).reshape(2, 1)}


def test_a_packed_decode_step_rotates_inside_the_attention(golden: Any) -> None:
    out = check_case(FuseAttentionRotary, "packed_decode", golden, expect_modified=True, expect_stats={"attention_rotary": 1},
                     shared_state="both", feeds={"position_ids": np.array([[5], [2]], np.int64)})  # fmt: skip
    assert not {"RotaryEmbedding", "Split", "Concat"} & set(out.op_counts())
    (gqa,) = out.nodes_by_op("GroupQueryAttention")
    assert gqa.attrs["do_rotary"] == 1 and gqa.attrs["rotary_interleaved"] == 0 and gqa.attrs["scale"] == pytest.approx(0.25)
    assert gqa.inputs[0].name == "qkv" and [t.name for t in gqa.inputs[7:]] == ["cos", "sin"]


def test_separate_q_k_v_are_concatenated_unrotated() -> None:
    before = Graph.parse(SEPARATE)
    result = run_pass(FuseAttentionRotary(), Graph.parse(SEPARATE))
    assert result.stats == {"attention_rotary": 1}
    (gqa,) = result.graph.nodes_by_op("GroupQueryAttention")
    concat = result.graph.producer(gqa.inputs[0])
    assert concat.op == "Concat" and [t.name for t in concat.inputs] == ["q", "k", "v"]
    feeds = _feeds(before, [7, 0])
    for want, got in zip(run_shared_state(session(before), feeds), run_shared_state(session(result.graph), feeds)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_padding_row_leaves_the_valid_row_and_the_slots_before_it_unchanged() -> None:
    """A padding row (position -1) is rotated at its harmless slot instead of at 0: only its own output and that slot
    change, which nothing reads before a token writes it."""
    before = Graph.parse(PACKED)
    after = run_pass(FuseAttentionRotary(), Graph.parse(PACKED)).graph
    feeds = _feeds(before, [-1, 3], seed=1)
    ref = dict(zip([o.name for o in before.outputs], run_shared_state(session(before), feeds)))
    got = dict(zip([o.name for o in after.outputs], run_shared_state(session(after), feeds)))
    np.testing.assert_allclose(got["y"][1], ref["y"][1], atol=1e-5)
    for name in ("past_key.0_RetainedState", "past_value.0_RetainedState"):
        np.testing.assert_allclose(got[name][1], ref[name][1], atol=1e-6)
        np.testing.assert_allclose(got[name][0, :, :7], ref[name][0, :, :7], atol=1e-6)  # slot 7: the padding row's


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (("num_heads: int = 4> (q,", "num_heads: int = 4, rotary_embedding_dim: int = 4> (q,"), "q: a partial rotary (4 of 16 channels)"),
        (("interleaved: int = 0, num_heads: int = 2", "interleaved: int = 1, num_heads: int = 2"), "k: an interleaved rotary"),
        (("(k, cos, sin, pos)", "(k, cos, sin, position_ids)"), "q and k are rotated with different tables or positions"),
        (("pos = Max (position_ids, zero)", "pos = Max (top, zero)"), "not shown to be the slot GroupQueryAttention writes"),
        (("=> (float[2,1,64] y,", "=> (float[2,1,32] kr, float[2,1,64] y,"), "k: the rotated tensor is read elsewhere"),
        (('(packed, "", "",', '(packed, "", "",'), None),  # the unedited graph: rewritten
    ],
)
def test_near_misses_are_declined_with_reasons(edit: tuple[str, str], reason: str | None) -> None:
    text = PACKED.replace(*edit)
    assert text != PACKED or reason is None
    p = FuseAttentionRotary()
    result = run_pass(p, Graph.parse(text))
    if reason is None:
        assert result.modified and not p.near_misses
        return
    assert not result.modified and len(p.near_misses) == 1 and reason in p.near_misses[0].reason, p.near_misses


def test_a_prompt_chunk_is_declined() -> None:
    """GroupQueryAttention's rotary over several tokens takes its positions from seqlens_k: decode only."""
    text = PACKED.replace("float[2,1,128] qkv", "float[1,2,128] qkv").replace("int64[2,1] position_ids", "int64[1,2] position_ids")
    text = (
        text.replace("float[2,2,8,16]", "float[1,2,8,16]").replace("float[2,1,64] y", "float[1,2,64] y").replace("rows = {2}", "rows = {1}")
    )
    p = FuseAttentionRotary()
    assert not run_pass(p, Graph.parse(text)).modified
    assert [m.reason for m in p.near_misses] == [
        "a chunk of 2 tokens: GroupQueryAttention's rotary takes its positions from seqlens_k (decode only)"
    ]


def test_a_head_size_the_kernel_refuses_is_declined() -> None:
    """ONNX Runtime 1.32's CPU GroupQueryAttention rotates heads of a multiple of 16 channels only ("head_size shall
    be a multiple of 16", found by running it); fuse-decode-attention's own limit is 8."""
    p = FuseAttentionRotary()
    assert not run_pass(p, Graph.parse(decode_step(8))).modified
    assert [m.reason for m in p.near_misses] == ["the head size 8 is not a multiple of 16, which GroupQueryAttention's rotary needs"]


def test_a_rotating_attention_is_left_alone() -> None:
    out = run_pass(FuseAttentionRotary(), Graph.parse(PACKED)).graph
    p = FuseAttentionRotary()
    assert not run_pass(p, out).modified and [m.reason for m in p.near_misses] == ["the attention rotates q and k already"]
