"""fuse-rotary: rotate-half RoPE as dynamo, TorchScript and Optimum write it -> RotaryEmbedding; near misses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import GOLDEN_DIR, assert_same_outputs, check_case, declined_reasons, hf_greedy, run_pass, session

from passes import FoldConstants, FuseRotary
from qgraph.ir.graph import Graph

POSITIONS = 8
OPTIMUM_LLAMA = Path(__file__).parent / "data" / "optimum-llama-2l" / "model.onnx"


def make() -> FuseRotary:
    return FuseRotary(positions=POSITIONS)


def fused(case: str, golden: Any, atol: float = 1e-5, make_pass: Any = make) -> Graph:
    out = check_case(make_pass, case, golden, expect_modified=True, expect_stats={"rotary": 1}, atol=atol)
    assert out.opset() == 23
    (node,) = out.nodes_by_op("RotaryEmbedding")
    assert node.attrs["interleaved"] == 0
    cos, sin = (out.const_value(t) for t in node.inputs[1:3])
    assert cos.shape == sin.shape == (POSITIONS, 4)
    return out


def test_dynamo_form_raises_the_opset_and_tables_hold_cos_of_each_position(golden: Any) -> None:
    out = fused("dynamo", golden)
    (node,) = out.nodes_by_op("RotaryEmbedding")
    inv_freq = np.array([1.0, 0.17782794, 0.031622775, 0.0056234132], np.float32)
    want = np.arange(POSITIONS, dtype=np.float32)[:, None] * inv_freq
    np.testing.assert_allclose(out.const_value(node.inputs[1]), np.cos(want), atol=1e-6)
    np.testing.assert_allclose(out.const_value(node.inputs[2]), np.sin(want), atol=1e-6)
    assert out.producer(node.inputs[3]).op == "Max"  # padding (-1) reads row 0


def test_torchscript_form_with_a_scaling_factor(golden: Any) -> None:
    out = fused("torchscript_scaled", golden)
    (node,) = out.nodes_by_op("RotaryEmbedding")
    assert out.const_value(node.inputs[1])[0].tolist() == [0.5] * 4  # cos(0) * 0.5: the graph's own formula


def test_head_split_is_rotated_before_it(golden: Any) -> None:
    out = fused("head_split", golden)
    assert [n.op for n in out.nodes] == ["Max", "RotaryEmbedding", "Reshape", "Transpose"]
    assert out.nodes_by_op("RotaryEmbedding")[0].attrs["num_heads"] == 2


def test_a_subgraph_that_reads_its_shape_is_evaluated_in_that_shape(golden: Any) -> None:
    out = fused("reads_its_shape", golden)
    (node,) = out.nodes_by_op("RotaryEmbedding")
    inv_freq = np.array([1.0, 0.17782794, 0.031622775, 0.0056234132], np.float32)
    want = np.arange(POSITIONS, dtype=np.float32)[:, None] * inv_freq * 3  # seq_len 3, not the 8 of one row of all positions
    np.testing.assert_allclose(out.const_value(node.inputs[1]), np.cos(want), atol=1e-5)


def test_partial_rotary_rotates_the_slice(golden: Any) -> None:
    out = check_case(make, "partial_rotary", golden, expect_modified=True, expect_stats={"rotary": 1})
    (node,) = out.nodes_by_op("RotaryEmbedding")
    assert out.const_value(node.inputs[1]).shape == (POSITIONS, 3)


def test_float16(golden: Any) -> None:
    out = fused("fp16", golden, atol=2e-3)
    assert out.const_value(out.nodes_by_op("RotaryEmbedding")[0].inputs[1]).dtype == np.float16


def test_without_ctx_len_the_retained_cache_gives_the_positions(golden: Any) -> None:
    fused("retained_cache", golden, make_pass=FuseRotary)


def test_padding_positions_are_harmless() -> None:
    """Position -1 (padding) runs, and every valid position's rows are unchanged."""
    before = Graph.parse((GOLDEN_DIR / "fuse-rotary" / "dynamo.before.onnxtxt").read_text())
    after = run_pass(make(), Graph.parse((GOLDEN_DIR / "fuse-rotary" / "dynamo.before.onnxtxt").read_text())).graph
    x = np.random.default_rng(0).standard_normal((2, 2, 3, 8)).astype(np.float32)
    pos = np.array([[3, 4, -1], [-1, -1, 7]])
    (want,), (got,) = (session(g).run(None, {"x": x, "position_ids": pos}) for g in (before, after))
    valid = pos >= 0
    np.testing.assert_allclose(got[:, :, :][valid[:, None, :].repeat(2, 1)], want[valid[:, None, :].repeat(2, 1)], atol=1e-5)
    assert np.isfinite(got).all()


def test_no_pattern_is_a_no_op(golden: Any) -> None:
    assert declined_reasons(make, "no_pattern", golden) == ["found no node, expected rotate_half(x) = Concat(Neg(Slice(x)), Slice(x))"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("uneven_halves", "rotate_half slices [0, 3] and [3, 9223372036854775807] of head_dim 8: not its two halves"),
        ("cos_from_input", "cos/sin must be computed from one tensor of positions and constants; they read"),
        ("not_halves", "cos is not two copies of one half along head_dim: not rotate-half RoPE"),
        ("rotate_half_used_elsewhere", "rotate_half(x) is a graph output"),
    ],
)
def test_near_misses_decline_with_a_reason(case: str, reason: str, golden: Any) -> None:
    reasons = declined_reasons(make, case, golden)
    assert any(reason in r for r in reasons), reasons


def test_unknown_number_of_positions_declines(golden: Any) -> None:
    reasons = declined_reasons(FuseRotary, "no_ctx_len", golden)
    assert reasons == ["the number of positions is unknown: no ctx_len was given and the graph has no retained cache of static length"]


def test_optimum_export_gets_one_rotary_per_attention_input() -> None:
    """Optimum's export (rotary subgraph from Shape(position_ids), Expand and MatMul): q and k of both layers."""
    before = Graph.load(OPTIMUM_LLAMA)
    graph = run_pass(FoldConstants(), Graph.load(OPTIMUM_LLAMA)).graph
    result = run_pass(FuseRotary(positions=64), graph)
    assert result.stats["rotary"] == 4 and result.graph.op_counts()["RotaryEmbedding"] == 4
    assert not result.graph.nodes_by_op("Sin")
    dims = {"batch_size": 2, "sequence_length": 3, "past_sequence_length": 5, "past_sequence_length + sequence_length": 8}
    feeds = {"position_ids": np.array([[5, 6, 7], [5, 6, 7]]), "attention_mask": np.ones((2, 8), np.int64)}
    assert_same_outputs(before, result.graph, dims=dims, feeds=feeds, atol=1e-4)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
#: id -> (family, seed, config fields): llama3 scaling with head_dim 10 and GQA 4; Phi-3's partial rotary (half of head_dim 16).
COMPILED = {
    "llama-llama3-head_dim10": ("llama", 2, dict(num_attention_heads=8, num_key_value_heads=2, head_dim=10, rope_scaling=LLAMA3)),
    "phi3-partial_rotary": ("phi3", 3, dict(num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0)),
}


@pytest.mark.parametrize("case", list(COMPILED))
def test_cpu_compile_rotates_q_and_k_of_every_layer_like_hugging_face(case: str, tmp_path: Path) -> None:
    """On the cpu target: one RotaryEmbedding per attention input (q and k of every layer) in both specializations,
    and Hugging Face's greedy tokens over a padded batch (padding positions -1 go through the fused nodes) with a
    prompt longer than the prefill chunk."""
    import onnx
    from transformers import AutoModelForCausalLM

    from qgraph.compile import compile_model
    from qgraph.frontend.export import export_model
    from qgraph.frontend.families import FAMILIES
    from qgraph.frontend.families.decoder import RANDOM_INIT_RANGE
    from qgraph.runtime import Runtime

    family, seed, fields = COMPILED[case]
    shape = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=211, max_position_embeddings=64,
                 initializer_range=RANDOM_INIT_RANGE, **fields)  # fmt: skip
    folder = FAMILIES[family].save_random(shape, tmp_path / "hf", seed=seed)
    raw = export_model(str(folder), tmp_path / "raw.onnx", exporter="torchscript").path
    art = compile_model(raw, "cpu", tmp_path / "art", prefill_seq_len=4, ctx_len=32, batch_size=2)
    for spec in ("prefill", "decode"):
        ops = [n.op_type for n in onnx.load(str(art / f"{spec}.onnx"), load_external_data=False).graph.node]
        assert ops.count("RotaryEmbedding") == 2 * shape["num_hidden_layers"], (spec, sorted(set(ops)))
        assert "Sin" not in ops and "Cos" not in ops
    prompts = [[5, 17, 42, 9, 100, 3, 8], [7, 8, 9]]
    got = Runtime(art).generate(prompts, max_new_tokens=10).tokens
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert got == [hf_greedy(hf, p, 10, distinct=4) for p in prompts]
