"""retain-kv-cache on a toy attention graph: golden, numerics, padding, declines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import GOLDEN_DIR, run_pass, session

from passes.retain_kv_cache import RetainKvCache
from qgraph.errors import OptionError, RewriteError
from qgraph.ir.graph import Graph

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
