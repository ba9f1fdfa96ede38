"""fuse-attention-rotary: RotaryEmbedding(q), RotaryEmbedding(k) -> GroupQueryAttention's do_rotary, at a decode step
and in a prompt chunk (which gives the attention its positions)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import GOLDEN_DIR, assert_same_outputs, check_case, run_pass, run_shared_state, session

from passes import FuseAttentionRotary
from qgraph.ir.graph import Graph

CASES = GOLDEN_DIR / "fuse-attention-rotary"


HEADER = """<
   ir_version: 10,
   opset_import: ["" : 23, "com.microsoft" : 1]
>
"""


#: Both cases' q, k and v: split from one product, q and k rotated, packed again for the attention (``seqlens`` made before).
ATTEND = """   q, k, v = Split <axis: int = -1> (qkv, widths)
   pos = Max (position_ids, zero)
   qr = RotaryEmbedding <interleaved: int = 0, num_heads: int = 4> (q, cos, sin, pos)
   kr = RotaryEmbedding <interleaved: int = 0, num_heads: int = 2> (k, cos, sin, pos)
   packed = Concat <axis: int = -1> (qr, kr, v)
   y, "past_key.0_RetainedState", "past_value.0_RetainedState" = com.microsoft.GroupQueryAttention <kv_num_heads: int = 2, num_heads: int = 4, scale: float = 0.25> (packed, "", "", "past_key.0", "past_value.0", seqlens, total)
"""


def _tables(h: int) -> tuple[str, str]:
    """The cos and sin tables of 8 positions for heads of ``h`` channels, as ONNX text."""
    angles = np.arange(8)[:, None] * 10000.0 ** (-np.arange(0, h, 2) / h)[None]
    return tuple(",".join(f"{x:.6g}" for x in f(angles).reshape(-1)) for f in (np.cos, np.sin))  # type: ignore[return-value]


def decode_step(h: int) -> str:
    """Two rows' decode step of 4 query and 2 KV heads of ``h`` channels over an 8-slot cache, as fuse-rotary and
    fuse-decode-attention leave it: q, k and v split from one product, q and k rotated, packed again for the attention;
    the slot is retain-kv-cache's padding chain around the positions (the golden case is ``decode_step(16)``)."""
    cos, sin = _tables(h)
    q, kv = 4 * h, 2 * h
    return f"""{HEADER}packed_decode (float[2,1,{q + 2 * kv}] qkv, int64[2,1] position_ids, float[2,2,8,{h}] "past_key.0", float[2,2,8,{h}] "past_value.0") => (float[2,1,{q}] y, float[2,2,8,{h}] "past_key.0_RetainedState", float[2,2,8,{h}] "past_value.0_RetainedState")
   <int64 zero = {{0}}, int64[1] one = {{1}}, int64 last = {{7}}, int64[1] rows = {{2}}, int32 total = {{8}}, int64[3] widths = {{{q},{kv},{kv}}}, float[8,{h // 2}] cos = {{{cos}}}, float[8,{h // 2}] sin = {{{sin}}}>
{{
   valid = GreaterOrEqual (position_ids, zero)
   top = ReduceMax <keepdims: int = 1> (position_ids, one)
   p = Where (valid, position_ids, top)
   pad = Less (p, zero)
   slot = Where (pad, last, p)
   rowslot = Reshape (slot, rows)
   seqlens = Cast <to: int = 6> (rowslot)
{ATTEND}}}
"""


def prompt_chunk(h: int) -> str:
    """One row's prompt chunk of 4 tokens, 4 query and 2 KV heads of ``h`` channels over an 8-slot cache, as fuse-rotary
    and fuse-decode-attention leave it: seqlens_k is the chunk's first position + 3 (the last slot it writes), the
    rotary's positions Max(position_ids, 0) (the golden case is ``prompt_chunk(16)``)."""
    cos, sin = _tables(h)
    q, kv = 4 * h, 2 * h
    return f"""{HEADER}packed_chunk (float[1,4,{q + 2 * kv}] qkv, int64[1,4] position_ids, float[1,2,8,{h}] "past_key.0", float[1,2,8,{h}] "past_value.0") => (float[1,4,{q}] y, float[1,2,8,{h}] "past_key.0_RetainedState", float[1,2,8,{h}] "past_value.0_RetainedState")
   <int64 zero = {{0}}, int64[1] first = {{0}}, int64[1] three = {{3}}, int64[1] rows = {{1}}, int32 total = {{8}}, int64[3] widths = {{{q},{kv},{kv}}}, float[8,{h // 2}] cos = {{{cos}}}, float[8,{h // 2}] sin = {{{sin}}}>
{{
   p0 = Gather <axis: int = 1> (position_ids, first)
   last = Add (p0, three)
   rowlast = Reshape (last, rows)
   seqlens = Cast <to: int = 6> (rowlast)
{ATTEND}}}
"""


PACKED = decode_step(16)
CHUNK = prompt_chunk(16)
#: q, k and v as three inputs instead of one packed product's Split.
SEPARATE = PACKED.replace("float[2,1,128] qkv,", "float[2,1,64] q, float[2,1,32] k, float[2,1,32] v,").replace(
    "   q, k, v = Split <axis: int = -1> (qkv, widths)\n", ""
)


def test_the_golden_cases_are_the_graphs_described() -> None:
    assert (CASES / "packed_decode.before.onnxtxt").read_text() == PACKED
    assert (CASES / "packed_chunk.before.onnxtxt").read_text() == CHUNK


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


@pytest.mark.parametrize("positions", [[0, 1, 2, 3], [4, 5, 6, 7], [4, 5, -1, -1]], ids=["first", "after-a-past", "right-padded"])
def test_a_prompt_chunk_rotates_inside_the_attention_at_its_positions(positions: list[int], golden: Any) -> None:
    """A chunk's attention takes the rotary's positions (position_ids): exact for every token and every slot, a
    right-padded last chunk included, where GroupQueryAttention's own positions (from seqlens_k) would be wrong."""
    feeds = {"position_ids": np.array([positions], np.int64)}
    out = check_case(FuseAttentionRotary, "packed_chunk", golden, expect_modified=True, expect_stats={"attention_rotary": 1},
                     shared_state="both", feeds=feeds, atol=1e-6)  # fmt: skip
    (gqa,) = out.nodes_by_op("GroupQueryAttention")
    assert gqa.attrs["do_rotary"] == 1 and gqa.inputs[0].name == "qkv"
    assert [t.name for t in gqa.inputs[7:]] == ["cos", "sin", "pos"] and out.producer(gqa.inputs[9]).op == "Max"


def _single_kv_head_chunk(view_shape: str) -> str:
    """CHUNK with one KV head of 32 channels whose rotated k reaches the Concat as fuse-decode-attention writes a
    chunk's heads: Reshape to ``view_shape``, Transpose(0, 2, 1, 3), Reshape back to [1, 4, 32]."""
    tables = _tables(32)
    text = prompt_chunk(16).replace("kv_num_heads: int = 2, num_heads: int = 4", "kv_num_heads: int = 1, num_heads: int = 2")
    text = (
        text.split("float[8,8] cos = {")[0]
        + f"float[8,16] cos = {{{tables[0]}}}, float[8,16] sin = {{{tables[1]}}}>"
        + text.split("}>", 1)[1]
    )
    text = text.replace(
        "RotaryEmbedding <interleaved: int = 0, num_heads: int = 2>", "RotaryEmbedding <interleaved: int = 0, num_heads: int = 1>"
    )
    text = text.replace("float[1,2,8,16]", "float[1,1,8,32]").replace("num_heads: int = 4> (q,", "num_heads: int = 2> (q,")
    text = text.replace("int64[1] rows = {1},", f"int64[1] rows = {{1}}, int64[4] heads = {{{view_shape}}}, int64[3] merged = {{1,4,32}},")
    return text.replace(
        "   packed = Concat <axis: int = -1> (qr, kr, v)\n",
        "   k4 = Reshape (kr, heads)\n   kt = Transpose <perm: ints = [0, 2, 1, 3]> (k4)\n   km = Reshape (kt, merged)\n"
        "   packed = Concat <axis: int = -1> (qr, km, v)\n",
    )


def test_a_single_kv_heads_views_are_read_through() -> None:
    """One KV head (Gemma 2B's multi-query attention): the Transpose moves a size-1 axis only, so the rotated k reaches
    the attention in its own layout and the attention can rotate it; with two heads the Transpose moves data."""
    text = _single_kv_head_chunk("1,1,4,32")  # 2 query heads and 1 KV head of 32 channels: the same 128-wide qkv
    before = Graph.parse(text)
    result = run_pass(FuseAttentionRotary(), Graph.parse(text))
    assert result.stats == {"attention_rotary": 1}
    ops = result.graph.op_counts()
    assert not {"RotaryEmbedding", "Transpose", "Split", "Concat"} & set(ops) and ops["Reshape"] == 1, ops  # seqlens_k's
    feeds = {"position_ids": np.array([[4, 5, -1, -1]], np.int64)}
    assert_same_outputs(before, result.graph, atol=1e-6, shared_state="both", feeds=feeds)
    p = FuseAttentionRotary()
    moving = _single_kv_head_chunk("1,2,4,16")
    assert not run_pass(p, Graph.parse(moving)).modified
    assert [m.reason for m in p.near_misses] == ["k: not rotated by an opset-23 RotaryEmbedding with positions"]


def test_a_chunk_in_several_rows_is_declined() -> None:
    text = CHUNK.replace("float[1,4,128] qkv", "float[2,4,128] qkv").replace("int64[1,4] position_ids", "int64[2,4] position_ids")
    text = (
        text.replace("float[1,2,8,16]", "float[2,2,8,16]").replace("float[1,4,64] y", "float[2,4,64] y").replace("rows = {1}", "rows = {2}")
    )
    p = FuseAttentionRotary()
    assert not run_pass(p, Graph.parse(text)).modified
    assert [m.reason for m in p.near_misses] == ["a chunk of 4 tokens in 2 rows (GroupQueryAttention takes a chunk in one row only)"]


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


def test_the_dead_nodes_it_drops_first_count_as_a_change() -> None:
    """It drops what fuse-decode-attention left dead (else they read as other readers of the rotary): a run that then
    fuses nothing still changed the graph, and says so (the pass debugger printed 'no' beside 106 -> 68 nodes)."""
    graph = Graph.parse(decode_step(8))  # declined: a head size the kernel's rotary refuses
    x = graph.inputs[0]
    graph.add_node("Neg", [x], 1, prefix="dead")  # read by nothing
    result = run_pass(FuseAttentionRotary(), graph)
    assert result.modified and result.stats.get("dead_nodes_removed") == 1 and "attention_rotary" not in result.stats
    assert not run_pass(FuseAttentionRotary(), result.graph).modified
