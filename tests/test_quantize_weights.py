"""quantize-weights: linear layers, the tied vocabulary and the token embedding in int8/int4 blocks; near misses."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import GOLDEN_DIR, check_case, run_pass, session

from passes import QuantizeWeights
from passes.quantize_weights import candidate_block_size, unquantizable
from qgraph.ir.graph import Graph

#: Outputs of the golden graphs are sums of 32 products of values in [-1, 1] and N(0, 1) inputs (about +-3): int8
#: blocks of 16 with int8 activations (accuracy level 4) stay within this of fp32; a wrong layout is off by whole units.
INT8_ATOL = 0.15
INT4_ATOL = 1.0


def int8() -> QuantizeWeights:
    return QuantizeWeights("int8", 16)


def quantized(case: str, golden: Any, stats: dict[str, int], feeds: dict[str, np.ndarray] | None = None) -> Graph:
    return check_case(int8, case, golden, expect_modified=True, expect_stats=stats, atol=INT8_ATOL, feeds=feeds)


def declined(case: str, golden: Any) -> list[str]:
    p = int8()
    graph = Graph.parse((GOLDEN_DIR / p.name / f"{case}.before.onnxtxt").read_text())
    check_case(int8, case, golden, expect_modified=False)
    run_pass(p, graph)
    return [m.reason for m in p.near_misses]


def nbits(out: Graph) -> list[Any]:
    nodes = out.nodes_by_op("MatMulNBits")
    for n in nodes:
        assert n.domain == "com.microsoft" and n.attrs["bits"] == 8 and n.attrs["block_size"] == 16 and n.attrs["accuracy_level"] == 4
    return nodes


def test_gemm_bias_becomes_the_bias_input(golden: Any) -> None:
    out = quantized("gemm_bias", golden, {"gemm": 1})
    (mm,) = nbits(out)
    assert (mm.attrs["K"], mm.attrs["N"]) == (32, 8) and len(mm.inputs) == 6 and out.const_value(mm.inputs[5]).shape == (8,)
    assert [n.op for n in out.nodes] == ["MatMulNBits"]


def test_gemm_alpha_folds_into_the_weight_and_beta_c_is_added(golden: Any) -> None:
    out = quantized("gemm_transb_alpha_beta", golden, {"gemm": 1})
    (mm,) = nbits(out)
    assert (mm.attrs["K"], mm.attrs["N"]) == (32, 8) and len(mm.inputs) == 3
    (add,) = out.nodes_by_op("Add")
    assert out.const_value(add.inputs[1]).shape == (3, 8)


def test_a_shared_weight_is_quantized_once(golden: Any) -> None:
    out = quantized("matmul_shared_weight", golden, {"matmul": 1, "gemm": 1, "bytes_before": 32 * 32 * 4})
    first, second = nbits(out)
    assert first.inputs[1] is second.inputs[1] and first.inputs[2] is second.inputs[2]


def test_tied_embedding_shares_the_projections_blocks(golden: Any) -> None:
    feeds = {"input_ids": np.array([[0, 5, 15, 5]]), "position_ids": np.arange(4)[None]}
    out = quantized("tied_embedding", golden, {"matmul": 1, "embedding": 1, "tied_embedding": 1}, feeds)
    (mm,) = nbits(out)
    (gather,) = out.nodes_by_op("GatherBlockQuantized")
    assert gather.attrs == {"gather_axis": 0, "quantize_axis": 1, "block_size": 16, "bits": 8}
    assert gather.inputs[2] is mm.inputs[2]  # one scales tensor
    data, blocks = out.const_value(gather.inputs[0]), out.const_value(mm.inputs[1])
    assert data.shape == (16, 32) and blocks.shape == (16, 2, 16) and data.tobytes() == blocks.tobytes()  # stored once by content
    assert not out.nodes_by_op("Transpose") and [n.op for n in out.nodes].count("Gather") == 1  # the position table stays fp32


def test_an_exporters_copy_of_the_tied_weight_is_found_by_value(golden: Any) -> None:
    feeds = {"input_ids": np.array([[1, 2, 3, 15]])}
    out = quantized("tied_by_value", golden, {"matmul": 1, "embedding": 1, "tied_embedding": 1}, feeds)
    (gather,) = out.nodes_by_op("GatherBlockQuantized")
    assert gather.inputs[2] is nbits(out)[0].inputs[2]


def test_int4_blocks_and_the_bytes_they_save(golden: Any) -> None:
    graph = Graph.parse((GOLDEN_DIR / "quantize-weights" / "tied_embedding.before.onnxtxt").read_text())
    before = Graph.parse((GOLDEN_DIR / "quantize-weights" / "tied_embedding.before.onnxtxt").read_text())
    result = run_pass(QuantizeWeights("int4", 16, vocab_mode="int4"), graph)
    fp32 = 16 * 32 * 4
    # int4: 16 x 32 weights in 32 blocks of 16 -> 8 bytes of data and one fp32 scale per block.
    assert result.stats["bytes_before"] == 2 * fp32 and result.stats["bytes_after"] == 32 * (8 + 4)
    (mm,) = result.graph.nodes_by_op("MatMulNBits")
    assert mm.attrs["bits"] == 4 and result.graph.const_value(mm.inputs[1]).shape == (16, 2, 8)
    feeds = {"input_ids": np.array([[0, 5, 15, 5]]), "position_ids": np.arange(4)[None]}
    (want,) = session(before).run(None, feeds)
    (got,) = session(result.graph).run(None, feeds)
    assert np.abs(got - want).max() < INT4_ATOL


def test_the_vocabulary_is_rescored_in_int8_under_int4_by_default(golden: Any) -> None:
    """int4-rescore, the default under int4: the logits come from int4 blocks, then each row's top 8 are recomputed
    from int8 blocks, which the tied embedding shares; every other logit keeps its int4 value."""
    feeds = {"input_ids": np.array([[0, 5, 15, 5]]), "position_ids": np.arange(4)[None]}
    stats = {"matmul": 1, "embedding": 1, "tied_embedding": 1, "vocab_rescored": 1}
    out = check_case(lambda: QuantizeWeights("int4", 16), "vocab_rescore", golden, expect_modified=True, expect_stats=stats,
                     atol=INT4_ATOL, feeds=feeds)  # fmt: skip
    (mm,) = out.nodes_by_op("MatMulNBits")
    assert mm.attrs["bits"] == 4 and mm.attrs["block_size"] == 32  # the candidates' blocks: coarser, the whole K here
    embed, rows = sorted(out.nodes_by_op("GatherBlockQuantized"), key=lambda n: n.inputs[1].name != "input_ids")
    assert embed.attrs["bits"] == rows.attrs["bits"] == 8 and embed.inputs[2] is rows.inputs[2]  # one set of int8 scales
    assert embed.attrs["block_size"] == rows.attrs["block_size"] == 16  # the pass's own block size
    (topk,) = out.nodes_by_op("TopK")
    assert topk.inputs[0] is mm.outputs[0] and out.const_value(topk.inputs[1]).tolist() == [8]
    (want,) = session(Graph.parse((GOLDEN_DIR / "quantize-weights" / "vocab_rescore.before.onnxtxt").read_text())).run(None, feeds)
    out.gs.outputs.append(mm.outputs[0].to_variable(dtype=np.float32))  # the int4 logits too
    got, rough = session(out).run(None, feeds)
    picked = np.zeros(rough.shape, bool)
    np.put_along_axis(picked, np.argsort(-rough, axis=-1)[..., :8], True, axis=-1)
    assert np.array_equal(got[~picked], rough[~picked])
    err, rough_err = np.abs(got - want)[picked], np.abs(rough - want)[picked]
    assert err.max() < INT8_ATOL and rough_err.mean() > 3 * err.mean(), (err.max(), rough_err.mean(), err.mean())


@pytest.mark.parametrize(("k", "block", "want"), [(768, 32, 128), (96, 32, 32), (80, 16, 16), (4096, 256, 256), (1536, 64, 128)])
def test_the_candidate_projection_takes_the_coarsest_block_that_divides_its_width(k: int, block: int, want: int) -> None:
    """The int4 candidates only pick which logits to recompute, so their blocks are coarser (faster: MatMulNBits on
    768 x 32000 took 289 us in blocks of 128 against 386 in blocks of 32): CANDIDATE_BLOCK, halved until it divides K,
    never finer than the pass's own block size."""
    assert candidate_block_size(k, block) == want


def test_the_vocabulary_modes(golden: Any) -> None:
    """vocab_mode int8: the projection to the logits (here tied to the embedding, which shares its blocks) in int8, a
    linear layer whose output is not a graph output in the mode's bits; int4: all int4; an unknown mode is refused."""
    text = (GOLDEN_DIR / "quantize-weights" / "tied_embedding.before.onnxtxt").read_text()
    graph = Graph.parse(text.replace("h = Add (e, p)", "h0 = Add (e, p)\n   h = MatMul (h0, H)").replace(
        "float[4,32] P =", "float[32,32] H = {" + ",".join(["0.01"] * 32 * 32) + "}, float[4,32] P ="))  # fmt: skip
    result = run_pass(QuantizeWeights("int4", 16, vocab_mode="int8"), graph)
    assert result.stats["vocab_projection"] == 1 and result.stats["tied_embedding"] == 1 and "vocab_rescored" not in result.stats
    bits = {n.outputs[0].name: n.attrs["bits"] for n in result.graph.nodes_by_op("MatMulNBits")}
    assert bits == {"h": 4, "logits": 8}
    (gather,) = result.graph.nodes_by_op("GatherBlockQuantized")
    assert gather.attrs["bits"] == 8
    out = run_pass(QuantizeWeights("int4", 16, vocab_mode="int4"), Graph.parse(text)).graph
    assert {n.attrs["bits"] for n in [*out.nodes_by_op("MatMulNBits"), *out.nodes_by_op("GatherBlockQuantized")]} == {4}
    assert not out.nodes_by_op("TopK")
    assert QuantizeWeights("int8").vocab_mode == "int8" and QuantizeWeights("int4").vocab_mode == "int4-rescore"
    with pytest.raises(ValueError, match="quantize-weights takes vocab_mode int8, int4, int4-rescore, not 'int2'"):
        QuantizeWeights("int4", vocab_mode="int2")


def test_a_rescored_projection_adds_its_bias_to_the_candidates() -> None:
    """A Gemm with a bias row making the logits (8 of them: every one is a candidate): the rescored logits are int8's
    products plus the bias picked at each candidate."""
    text = (GOLDEN_DIR / "quantize-weights" / "gemm_bias.before.onnxtxt").read_text()
    out = run_pass(QuantizeWeights("int4", 16), Graph.parse(text)).graph
    assert out.op_counts()["TopK"] == 1 and out.op_counts()["Gather"] == 1  # the bias at the candidates
    feeds = {"x": np.random.default_rng(3).standard_normal((3, 32)).astype(np.float32)}
    (want,) = session(Graph.parse(text)).run(None, feeds)
    (got,) = session(out).run(None, feeds)
    assert np.abs(got - want).max() < INT8_ATOL, np.abs(got - want).max()


def test_a_vocabulary_that_cannot_be_rescored_takes_int8(golden: Any) -> None:
    """Below opset 13 (Unsqueeze and ReduceSum take their axes as attributes there) the projection is not rescored:
    it takes the rescoring's int8 blocks instead, as --quant-vocab int8 would."""
    text = (GOLDEN_DIR / "quantize-weights" / "tied_embedding.before.onnxtxt").read_text().replace('"" : 17', '"" : 12')
    result = run_pass(QuantizeWeights("int4", 16), Graph.parse(text))
    assert result.stats["rescore_declined"] == 1 and "vocab_rescored" not in result.stats
    assert [n.attrs["bits"] for n in result.graph.nodes_by_op("MatMulNBits")] == [8] and not result.graph.nodes_by_op("TopK")


def test_the_blocks_decode_to_the_weights(golden: Any) -> None:
    """Each weight is within one quantization step of its block's value (the layout MatMulNBits reads; half a step but
    where symmetric int4 clips +8 to +7), and most within half a step (ties round either way)."""
    graph = Graph.parse((GOLDEN_DIR / "quantize-weights" / "gemm_bias.before.onnxtxt").read_text())
    w = graph.const_value(graph.nodes[0].inputs[1])
    out = run_pass(QuantizeWeights("int4", 16, vocab_mode="int4"), graph).graph  # the Gemm makes the logits: a vocabulary
    (mm,) = out.nodes_by_op("MatMulNBits")
    data, scales = out.const_value(mm.inputs[1]), out.const_value(mm.inputs[2])  # [N, K/16, 8] uint8, [N, K/16]
    q = np.stack([data & 0xF, data >> 4], axis=-1).reshape(8, 2, 16).astype(np.float32) - 8  # low nibble first, zero point 8
    deq = (q * scales[:, :, None]).reshape(8, 32).T  # [K, N]
    step = np.repeat(np.abs(scales.T), 16, axis=0)
    assert np.all(np.abs(deq - w) <= step + 1e-6) and np.mean(np.abs(deq - w) <= step / 2 + 1e-6) > 0.9


@pytest.mark.parametrize(
    ("case", "reasons"),
    [
        ("weight_is_input", ["the weight 'w' is a graph input, not a constant"]),
        ("weight_computed", ["the weight 'kr' is computed at run time (by Relu), not a constant"]),
        ("already_quantized", ["the graph is already quantized (it holds MatMulNBits)"]),
    ],
)
def test_near_misses_decline_with_a_reason(case: str, reasons: list[str], golden: Any) -> None:
    assert declined(case, golden) == reasons


def test_the_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="quantize-weights takes mode int8 or int4, not 'int2'"):
        QuantizeWeights("int2")


def test_the_pipeline_quantizes_last_and_only_when_asked() -> None:
    from qgraph.errors import UnknownPassError
    from qgraph.pipeline.options import Options
    from qgraph.pipeline.registry import build_passes
    from qgraph.pipeline.stages import compile_pipeline, default_pipeline
    from qgraph.targets import get_target

    cpu = get_target("cpu")
    rewrite, specialize = compile_pipeline(cpu, rewrite=True, quantize=True)
    # pack-matmuls goes with quantization: it pays with quantized weights only (qgraph.pipeline.stages.QUANTIZE_PASSES).
    assert specialize[-4:] == ["fold-identities", "pack-matmuls", "quantize-weights", "cleanup"] and "quantize-weights" not in rewrite
    assert not {"pack-matmuls", "quantize-weights"} & set(compile_pipeline(cpu, rewrite=True)[1])
    assert default_pipeline(False, True)[-5:] == ["retain-kv-cache", "cleanup", "pack-matmuls", "quantize-weights", "cleanup"]
    assert default_pipeline(True, True)[-5:] == ["pin-static-shapes", "cleanup", "pack-matmuls", "quantize-weights", "cleanup"]
    (p,) = build_passes(["quantize-weights"], Options.resolve(quantize="int8", quant_block_size=64))
    assert isinstance(p, QuantizeWeights) and (p.bits, p.block_size) == (8, 64)
    with pytest.raises(UnknownPassError, match="quantize-weights needs --quantize int8 or int4"):
        build_passes(["quantize-weights"], Options.resolve())


def test_a_column_c_is_added_not_taken_as_the_bias_row() -> None:
    """Gemm's C of shape [M, 1] broadcasts along N: with M = N it has N values but is no bias row."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w, c = rng.uniform(-1, 1, (32, 3)).astype(np.float32), np.array([[5.0], [-5.0], [10.0]], np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"])]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 32])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])]
    model = helper.make_model(helper.make_graph(nodes, "g", *io, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")]),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    model.ir_version = 10
    out = run_pass(int8(), Graph.from_proto(model)).graph
    assert [n.op for n in out.nodes] == ["MatMulNBits", "Add"]
    x = rng.standard_normal((3, 32)).astype(np.float32)
    (y,) = session(out).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w + c, atol=INT8_ATOL)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_asymmetric_blocks_carry_zero_points(mode: str) -> None:
    """Symmetric by default; asymmetric blocks (a zero point per block) fit weights that are not centred on zero."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    table, w = rng.uniform(0.2, 1.5, (8, 32)).astype(np.float32), rng.uniform(0.5, 2.0, (32, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["e"]), helper.make_node("MatMul", ["e", "W"], ["y"])]
    io = (
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4])],
    )
    model = helper.make_model(helper.make_graph(nodes, "g", *io, [numpy_helper.from_array(table, "E"), numpy_helper.from_array(w, "W")]),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    model.ir_version = 10
    ids = np.array([[0, 7, 3]])
    errors = {}
    for symmetric in (True, False):
        p = QuantizeWeights(mode, 16, symmetric=symmetric, vocab_mode=mode)  # y is the logits: the vocabulary
        out = run_pass(p, Graph.from_proto(model)).graph
        (mm,), (gather,) = out.nodes_by_op("MatMulNBits"), out.nodes_by_op("GatherBlockQuantized")
        assert (len(mm.inputs), len(gather.inputs)) == ((3, 3) if symmetric else (4, 4))
        (y,) = session(out).run(None, {"input_ids": ids})
        errors[symmetric] = np.abs(y - table[ids] @ w).max()
    assert errors[False] < errors[True] and errors[False] < (INT8_ATOL if mode == "int8" else INT4_ATOL)


def test_a_graph_it_cannot_act_on_is_named_before_the_work() -> None:
    """What ``--quantize`` refuses up front (compile, optimize): an already quantized graph, float16 linear weights
    (a ``--dtype float16`` export: the pass would decline every weight and the artifact would be fp16 labelled int4)."""

    def before(case: str) -> Graph:
        return Graph.parse((GOLDEN_DIR / "quantize-weights" / f"{case}.before.onnxtxt").read_text())

    assert unquantizable(before("already_quantized")) == "the graph is already quantized (it holds MatMulNBits); use it without --quantize"
    assert unquantizable(before("weight_is_input")) is None  # the pass's own near miss
    fp16 = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float16[2, 4] x) => (float16[2, 3] y) {
        w = Constant <value = float16[4, 3] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> ()
        y = MatMul (x, w)
    }
    """
    assert unquantizable(Graph.parse(fp16)) == ("its linear layers' weights are float16; weight-only quantization takes a "
                                                "float32 model (export it in float32: drop --dtype float16)")  # fmt: skip
    assert unquantizable(Graph.parse(fp16.replace("float16", "float"))) is None
