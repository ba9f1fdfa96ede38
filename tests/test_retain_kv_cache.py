"""retain-kv-cache on toy attention graphs (MatMul/Softmax and the opset-23 Attention op): golden, numerics, padding,\ndeclines with reasons, and a graph without a growing cache refused by the default pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import GOLDEN_DIR, cli_command, run_all, run_pass, session

from passes.retain_kv_cache import RetainKvCache
from qgraph.devtools.golden import canonical_text
from qgraph.errors import OptionError, RewriteError
from qgraph.ir.graph import Graph
from qgraph.pipeline.optimize import optimize

CASES = GOLDEN_DIR / "retain-kv-cache"
CTX = 8


def _toy() -> Graph:
    return Graph.parse((CASES / "toy_attention.before.onnxtxt").read_text())


@pytest.fixture(scope="module")
def retained() -> Graph:
    graph = run_pass(RetainKvCache(ctx_len=CTX), _toy()).graph
    graph.check()
    return graph


def test_toy_attention_golden_and_contract(retained: Graph, golden) -> None:
    golden.check(retained, "retain-kv-cache/toy_attention.after.onnxtxt")
    assert [t.name for t in retained.inputs] == ["input_ids", "position_ids", "past_key.0", "past_value.0"]
    assert [t.name for t in retained.outputs] == ["logits", "past_key.0_RetainedState", "past_value.0_RetainedState"]
    assert list(retained.inputs[2].shape) == ["batch", 1, CTX, 2]
    assert list(retained.outputs[0].shape) == ["batch", 1, 3]
    ops = retained.op_counts()
    assert ops["ScatterND"] == 2 and "Concat" in ops and ops["Softmax"] == 1
    assert not any(n.op == "Cast" and n.inputs[0].name == "attention_mask" for n in retained.nodes)


def test_decode_step_matches_the_raw_graph_and_ignores_unused_slots(retained: Graph) -> None:
    raw, ret = session(_toy()), session(retained)
    rng = np.random.default_rng(0)
    past_len = 5
    past = {n: rng.standard_normal((2, 1, past_len, 2)).astype(np.float32) for n in ("past_key.0", "past_value.0")}
    ids = np.array([[1], [2]], np.int64)
    ref = raw.run(None, {"input_ids": ids, "attention_mask": np.ones((2, past_len + 1), np.int64),
                         "position_ids": np.full((2, 1), past_len, np.int64), **past})  # fmt: skip
    # Slots past the prompt hold garbage: the position mask must hide it.
    cache = {n: rng.standard_normal((2, 1, CTX, 2)).astype(np.float32) * 100 for n in past}
    for n in past:
        cache[n][:, :, :past_len] = past[n]
    out = ret.run(None, {"input_ids": ids, "position_ids": np.full((2, 1), past_len, np.int64), **cache})
    np.testing.assert_allclose(out[0][:, 0], ref[0][:, -1], atol=1e-5)
    np.testing.assert_allclose(out[1][:, :, : past_len + 1], ref[1], atol=0)  # keys written at position 5
    np.testing.assert_array_equal(out[1][:, :, past_len + 1 :], cache["past_key.0"][:, :, past_len + 1 :])


def test_padding_never_changes_a_visible_slot(retained: Graph) -> None:
    ret = session(retained)
    rng = np.random.default_rng(1)
    cache = {n: rng.standard_normal((3, 1, CTX, 2)).astype(np.float32) for n in ("past_key.0", "past_value.0")}
    ids = np.array([[1, 2, 0, 0], [2, 1, 1, 0], [0, 0, 0, 0]], np.int64)
    pos = np.array([[3, 4, -1, -1], [0, 1, 2, -1], [-1, -1, -1, -1]], np.int64)
    out = ret.run(None, {"input_ids": ids, "position_ids": pos, **cache})
    unpadded = ret.run(None, {"input_ids": ids[:1, :2], "position_ids": pos[:1, :2], **{n: v[:1] for n, v in cache.items()}})
    key = out[1]
    np.testing.assert_array_equal(key[0], unpadded[1][0])  # padding changed nothing in row 0
    np.testing.assert_allclose(out[0][0], unpadded[0][0], atol=1e-6)  # logits of the last valid token
    np.testing.assert_array_equal(key[0, :, :3], cache["past_key.0"][0, :, :3])  # slots before the chunk untouched
    np.testing.assert_array_equal(key[1, :, 3:], cache["past_key.0"][1, :, 3:])  # nothing written past position 2
    np.testing.assert_array_equal(key[2, :, : CTX - 1], cache["past_key.0"][2, :, : CTX - 1])  # all padding: only the last slot
    assert np.isfinite(out[0]).all()


def test_idempotent_and_declines_without_a_growing_cache(retained: Graph) -> None:
    again = RetainKvCache(ctx_len=CTX)
    assert again.run(retained).modified is False
    p = RetainKvCache(ctx_len=CTX)
    g = Graph.parse((CASES / "no_cache.before.onnxtxt").read_text())
    result = p.run(g)
    assert result.modified is False
    assert "no graph input is concatenated into a graph output" in p.declined[0]


def test_missing_position_ids_is_a_clear_error() -> None:
    text = (CASES / "toy_attention.before.onnxtxt").read_text().replace("position_ids", "pos_ids")
    with pytest.raises(RewriteError, match="no 'position_ids' input"):
        RetainKvCache(ctx_len=CTX).run(Graph.parse(text))


def test_ctx_len_must_be_positive() -> None:
    with pytest.raises(OptionError, match="ctx_len must be at least 1"):
        RetainKvCache(ctx_len=0)


def test_before_file_is_valid() -> None:
    assert Path(CASES / "toy_attention.before.onnxtxt").is_file()
    _toy().check()


# -- grouped KV heads: dynamo's repeat of the KV heads after the cache, its shapes computed from past_len + seq_len


def _toy_gqa(text: str | None = None) -> Graph:
    return Graph.parse(text or (CASES / "toy_gqa.before.onnxtxt").read_text())


@pytest.fixture(scope="module")
def retained_gqa() -> Graph:
    graph = run_pass(RetainKvCache(ctx_len=CTX), _toy_gqa()).graph
    graph.check()
    return graph


def test_gqa_golden_keeps_the_repeat_after_a_cache_of_kv_heads(retained_gqa: Graph, golden) -> None:
    golden.check(retained_gqa, "retain-kv-cache/toy_gqa.after.onnxtxt")
    assert [t.name for t in retained_gqa.inputs] == ["input_ids", "position_ids", "past_key.0", "past_value.0"]
    assert list(retained_gqa.inputs[2].shape) == ["batch", 1, CTX, 2]  # one KV head; the query has two
    g = retained_gqa
    repeats = [n for n in g.nodes_by_op("Unsqueeze") if (p := g.producer(n.inputs[0])) is not None and p.op == "ScatterND"]
    assert len(repeats) == 2 and all(g.consumers(n.outputs[0])[0].op == "Expand" for n in repeats)  # the repeat reads the retained cache


@pytest.mark.parametrize("steps", [[5], [2, 3]], ids=["decode", "chunks"])
def test_gqa_steps_match_the_raw_graph_whatever_the_unused_slots_hold(retained_gqa: Graph, steps: list[int]) -> None:
    raw, ret = session(_toy_gqa()), session(retained_gqa)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 3, (2, sum(steps) + 1))
    past = {n: np.zeros((2, 1, 0, 2), np.float32) for n in ("past_key.0", "past_value.0")}
    cache = {n: rng.standard_normal((2, 1, CTX, 2)).astype(np.float32) * 100 for n in past}  # garbage
    start = 0
    for n in [*steps, 1]:
        chunk, pos = ids[:, start : start + n], np.tile(np.arange(start, start + n), (2, 1))
        mask = np.ones((2, start + n), np.int64)
        ref = raw.run(None, {"input_ids": chunk, "attention_mask": mask, "position_ids": pos, **past})
        out = ret.run(None, {"input_ids": chunk, "position_ids": pos, **cache})
        np.testing.assert_allclose(out[0][:, 0], ref[0][:, -1], atol=1e-5)
        np.testing.assert_array_equal(out[1][:, :, : start + n], ref[1])
        past, cache = dict(zip(past, ref[1:])), dict(zip(cache, out[1:]))
        start += n


def test_gqa_is_idempotent(retained_gqa: Graph) -> None:
    p = RetainKvCache(ctx_len=CTX)
    assert p.run(retained_gqa).modified is False and p.declined == []


def test_a_cache_length_used_for_more_than_the_repeat_shapes_is_refused() -> None:
    # Positions computed from the cache's length (an export without position_ids would): past_len is not ctx_len - seq_len.
    text = (CASES / "toy_gqa.before.onnxtxt").read_text()
    text = text.replace(
        "pe = Gather (wpe, position_ids)", "r = Range (zero, seq, one)\n    where = Add (r, past_len)\n    pe = Gather (wpe, where)"
    )
    with pytest.raises(RewriteError, match=r"still reads the growing cache 'past_key.0'"):
        RetainKvCache(ctx_len=CTX).run(_toy_gqa(text))


# -- the standard ONNX Attention op (opset 23; dynamo's export at --opset 23 and 24)


def _toy_op() -> Graph:
    return Graph.parse((CASES / "toy_attention_op.before.onnxtxt").read_text())


@pytest.fixture(scope="module")
def retained_op() -> Graph:
    graph = run_pass(RetainKvCache(ctx_len=CTX), _toy_op()).graph
    graph.check()
    return graph


def test_attention_op_golden_and_contract(retained_op: Graph, golden) -> None:
    golden.check(retained_op, "retain-kv-cache/toy_attention_op.after.onnxtxt")
    assert [t.name for t in retained_op.inputs] == ["input_ids", "position_ids", "past_key.0", "past_value.0"]
    assert [t.name for t in retained_op.outputs] == ["logits", "past_key.0_RetainedState", "past_value.0_RetainedState"]
    assert list(retained_op.inputs[2].shape) == ["batch", 1, CTX, 2] and list(retained_op.outputs[0].shape) == ["batch", 1, 3]
    (att,) = retained_op.nodes_by_op("Attention")
    # The caches are written in place and read whole; the mask is the position mask, additive float (QNN takes it).
    assert [retained_op.producer(t).op for t in att.inputs[1:3]] == ["ScatterND", "ScatterND"]
    where = retained_op.producer(att.inputs[3])
    assert where.op == "Where" and [retained_op.const_value(t).dtype for t in where.inputs[1:]] == [np.float32] * 2
    assert int(att.attrs.get("is_causal", 0)) == 0 and att.attrs["scale"] == pytest.approx(0.7071)
    assert "Cast" not in retained_op.op_counts() or all(n.inputs[0].name != "attention_mask" for n in retained_op.nodes)


def test_attention_op_decode_step_matches_the_raw_graph(retained_op: Graph) -> None:
    raw, ret = session(_toy_op()), session(retained_op)
    rng = np.random.default_rng(0)
    past_len = 5
    past = {n: rng.standard_normal((2, 1, past_len, 2)).astype(np.float32) for n in ("past_key.0", "past_value.0")}
    ids = np.array([[1], [2]], np.int64)
    ref = raw.run(None, {"input_ids": ids, "attention_mask": np.ones((2, past_len + 1), np.int64),
                         "position_ids": np.full((2, 1), past_len, np.int64), **past})  # fmt: skip
    cache = {n: rng.standard_normal((2, 1, CTX, 2)).astype(np.float32) * 100 for n in past}  # garbage past the prompt
    for n in past:
        cache[n][:, :, :past_len] = past[n]
    out = ret.run(None, {"input_ids": ids, "position_ids": np.full((2, 1), past_len, np.int64), **cache})
    np.testing.assert_allclose(out[0][:, 0], ref[0][:, -1], atol=1e-5)
    np.testing.assert_allclose(out[1][:, :, : past_len + 1], ref[1], atol=0)
    np.testing.assert_array_equal(out[1][:, :, past_len + 1 :], cache["past_key.0"][:, :, past_len + 1 :])


def test_attention_op_padding_rows_stay_finite_and_change_nothing_visible(retained_op: Graph) -> None:
    ret = session(retained_op)
    rng = np.random.default_rng(1)
    cache = {n: rng.standard_normal((2, 1, CTX, 2)).astype(np.float32) for n in ("past_key.0", "past_value.0")}
    ids = np.array([[1, 2, 0], [0, 0, 0]], np.int64)
    pos = np.array([[3, 4, -1], [-1, -1, -1]], np.int64)  # row 1 is all padding: every slot hidden
    out = ret.run(None, {"input_ids": ids, "position_ids": pos, **cache})
    unpadded = ret.run(None, {"input_ids": ids[:1, :2], "position_ids": pos[:1, :2], **{n: v[:1] for n, v in cache.items()}})
    np.testing.assert_array_equal(out[1][0], unpadded[1][0])
    np.testing.assert_allclose(out[0][0], unpadded[0][0], atol=1e-6)
    assert np.isfinite(out[0]).all()


def test_attention_op_is_idempotent(retained_op: Graph) -> None:
    p = RetainKvCache(ctx_len=CTX)
    assert p.run(retained_op).modified is False and p.declined == []


ATTENTION_OP = """<ir_version: 10, opset_import: ["" : 23]>
g (int64[batch, seq_len] input_ids, int64[batch, seq_len] position_ids, float[batch, 1, past_len, 2] "past_key.0",
   float[batch, 1, past_len, 2] "past_value.0") => (float[batch, seq_len, 2] y, float[batch, 1, total_len, 2] "present_key.0",
   float[batch, 1, total_len, 2] "present_value.0"{extra_out})
<float[3, 2] wte = {{0.1, 0.2, 0.3, -0.4, 0.5, 0.6}}, int64[1] one = {{1}}>
{{
    tok = Gather (wte, input_ids)
    x = Unsqueeze (tok, one)
    "present_key.0" = Concat <axis = -2> ("past_key.0", x)
    "present_value.0" = Concat <axis = -2> ("past_value.0", x)
    {attention}
    y = Squeeze (attn, one)
}}"""
WTE = np.array([[0.1, 0.2], [0.3, -0.4], [0.5, 0.6]], np.float32)


def _attention_op(attention: str, extra_out: str = "") -> Graph:
    return Graph.parse(ATTENTION_OP.format(attention=attention, extra_out=extra_out))


def test_a_causal_attention_op_without_mask_gets_the_position_mask() -> None:
    g = _attention_op('attn = Attention <is_causal = 1> (x, "present_key.0", "present_value.0")')
    run_pass(RetainKvCache(ctx_len=CTX), g)
    g.check()
    (att,) = g.nodes_by_op("Attention")
    assert int(att.attrs["is_causal"]) == 0 and g.producer(att.inputs[3]).op == "Where"
    # Causal by position: the last valid token at position p sees slots 0..p, itself written at p.
    rng = np.random.default_rng(2)
    cache = {n: rng.standard_normal((1, 1, CTX, 2)).astype(np.float32) for n in ("past_key.0", "past_value.0")}
    ids = np.array([[2, 1]], np.int64)
    x = WTE[ids[0]]
    for pos, last in (([2, 3], 1), ([2, -1], 0)):
        y = session(g).run(None, {"input_ids": ids, "position_ids": np.array([pos], np.int64), **cache})[0]
        k, v = (cache[n][0, 0].copy() for n in ("past_key.0", "past_value.0"))
        k[2 : 3 + last] = v[2 : 3 + last] = x[: last + 1]
        s = x[last] @ k[: pos[last] + 1].T / np.sqrt(2)
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        np.testing.assert_allclose(y[0, 0], p @ v[: pos[last] + 1], atol=1e-5)


@pytest.mark.parametrize(
    "attention,extra_out,reason",
    [
        ('attn, "present_key.1", "present_value.1" = Attention ("x", "x", "x", , "present_key.0", "present_value.0")',
         ', float[batch, 1, total_len, 2] "present_key.1", float[batch, 1, total_len, 2] "present_value.1"',
         "takes its own past_key/past_value"),
        ('attn, , , qk = Attention <qk_matmul_output_mode = 1> (x, "present_key.0", "present_value.0")',
         ", float[batch, 1, seq_len, total_len] qk", "uses output 'qk'"),
    ],
)  # fmt: skip
def test_attention_ops_it_cannot_rewrite_are_refused_with_a_reason(attention: str, extra_out: str, reason: str) -> None:
    with pytest.raises(RewriteError, match=reason):
        RetainKvCache(ctx_len=CTX).run(_attention_op(attention, extra_out))


# -- no growing cache: a reason, in the pass, the report and from optimize


def _combined() -> Graph:
    return Graph.parse((CASES / "combined_past.before.onnxtxt").read_text())


NO_CACHE_EXPORT = """<ir_version: 10, opset_import: ["" : 17]>
lm (int64[batch, seq_len] input_ids, int64[batch, seq_len] attention_mask) => (float[batch, seq_len, 3] logits)
<float[3, 2] wte = {0.1, 0.2, 0.3, -0.4, 0.5, 0.6}, float[2, 3] head = {1.0, -1.0, 0.5, 0.25, 2.0, -0.5}>
{
    tok = Gather (wte, input_ids)
    logits = MatMul (tok, head)
}"""


@pytest.mark.parametrize(
    "graph,reason",
    [
        (_combined, "input 'past_0' holds key and value in one tensor [2, batch, heads, past_len, head_dim]"),
        (lambda: Graph.parse(NO_CACHE_EXPORT), "the graph has no KV cache inputs (an export without past key/values)"),
    ],
)
def test_no_growing_cache_is_declined_with_the_reason_in_the_report_notes(graph: Any, reason: str) -> None:
    p = RetainKvCache(ctx_len=CTX)
    g = graph()
    before = canonical_text(g)
    result = p.run(g)
    assert result.modified is False and canonical_text(g) == before
    assert reason in p.declined[0] and list(result.notes) == p.declined
    report = optimize(graph(), ["retain-kv-cache"], ctx_len=CTX)  # passes named: the partial graph, and why
    assert any(reason in n for n in report.notes) and reason in report.table() and reason in report.to_json()


def test_the_default_pipeline_refuses_a_graph_it_cannot_retain() -> None:
    with pytest.raises(RewriteError, match=r"cannot become the retained-state contract.*past_0.*one tensor"):
        optimize(_combined(), ctx_len=CTX)
    with pytest.raises(RewriteError, match=r"cannot become the retained-state contract.*no KV cache inputs"):
        optimize(Graph.parse(NO_CACHE_EXPORT), ctx_len=CTX)


def test_an_already_retained_graph_passes_the_default_pipeline(retained: Graph) -> None:
    p = RetainKvCache(ctx_len=CTX)
    assert p.run(retained).modified is False and p.declined == []
    report = optimize(retained, ctx_len=CTX)
    assert not report.notes


def test_cli_optimize_exits_2_with_the_reason_unless_passes_are_named(tmp_path: Path) -> None:
    src = _combined().save(tmp_path / "combined.onnx")
    out = tmp_path / "out.onnx"
    default, named, named_json = run_all([
        cli_command("optimize", str(src), "-o", str(out)),
        cli_command("optimize", str(src), "-o", str(tmp_path / "named.onnx"), "--passes", "fold-constants,retain-kv-cache"),
        cli_command("optimize", str(src), "-o", str(tmp_path / "named2.onnx"), "--passes", "retain-kv-cache", "--json"),
    ])  # fmt: skip
    assert default.returncode == 2 and not out.exists(), default
    (line,) = default.stderr.strip().splitlines()[-1:]
    assert line.startswith("qgraph optimize: error:") and "past_0" in line and "Traceback" not in default.stderr
    assert named.returncode == 0 and "note: retain-kv-cache:" in named.stdout and "past_0" in named.stdout
    assert named_json.returncode == 0
    assert any("past_0" in n for n in json.loads(named_json.stdout)["notes"])


def test_compile_of_a_graph_without_a_growing_cache_says_why(tmp_path: Path) -> None:
    from qgraph.compile import compile_model

    with pytest.raises(RewriteError, match=r"past_0.*one tensor"):
        compile_model(_combined(), "cpu", tmp_path / "art", prefill_seq_len=2, ctx_len=CTX)
    assert not (tmp_path / "art").exists()
