"""pin-static-shapes: golden toy, dim names and expressions, errors, Optimum and real exports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import GOLDEN_DIR, assert_same_outputs, check_case, random_gpt2, run_pass, session

from passes.cleanup import Cleanup
from passes.fold_constants import FoldConstants
from passes.pin_static_shapes import PinStaticShapes, dim_size
from qgraph.errors import StaticShapeError
from qgraph.frontend.export import export_model
from qgraph.ir.graph import Graph

CASES = GOLDEN_DIR / "pin-static-shapes"
OPTIMUM = Path(__file__).parent / "data" / "optimum-gpt2-2l" / "model.onnx"
SIZES = {"batch": 2, "seq_len": 3, "total_len": 5}


def _toy() -> Graph:
    return Graph.parse((CASES / "toy.before.onnxtxt").read_text())


def _static_io(graph: Graph) -> None:
    for t in graph.inputs + graph.outputs:
        assert t.shape is not None and all(isinstance(d, int) for d in t.shape), (t.name, t.shape)
    assert not graph.nodes_by_op("Shape") and not graph.nodes_by_op("Size")


@pytest.mark.parametrize("make", [lambda: PinStaticShapes(2, 3, dims={"total_len": 5}), lambda: PinStaticShapes(2, 3, ctx_len=5)],
                         ids=["dims", "ctx_len"])  # fmt: skip
def test_toy_pins_and_folds_the_shape_math(make: Any, golden: Any) -> None:
    # check_case feeds 3 for every symbolic dim; the pinned sizes differ, so
    # the same steps are spelled out with the right sizes.
    result = run_pass(make(), _toy())
    assert result.modified and result.stats == {"pinned_dims": 8, "folded": 8}
    out = result.graph
    out.check()
    golden.check(out, "pin-static-shapes/toy.after.onnxtxt")
    _static_io(out)
    assert [t.shape for t in out.outputs] == [[2, 3, 4], [2, 5]]
    assert_same_outputs(_toy(), out, dims=SIZES)
    assert run_pass(make(), out).modified is False


def test_a_static_graph_is_left_alone(golden: Any) -> None:
    check_case(lambda: PinStaticShapes(2, 3), "static", golden, expect_modified=False)


def test_dim_names_aliases_and_expressions() -> None:
    sizes = PinStaticShapes(1, 4, ctx_len=10, dims={"beam": 2}).sizes
    assert sizes["batch_size"] == 1 and sizes["sequence_length"] == 4
    assert sizes["past_len"] == sizes["past_sequence_length"] == 6 and sizes["total_len"] == 10
    assert dim_size("past_sequence_length + sequence_length", sizes) == 10
    assert dim_size("2*beam - 1", sizes) == 3
    assert dim_size("unknown + 1", sizes) is None and dim_size("__import__('os')", sizes) is None
    assert PinStaticShapes(1, 4, dims={"past_len": 3}).sizes["past_sequence_length"] == 3
    with pytest.raises(StaticShapeError, match="ctx_len 2 is shorter than seq_len 4"):
        PinStaticShapes(1, 4, ctx_len=2)


def test_an_unknown_input_dim_is_named() -> None:
    g = Graph.parse(
        """
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[batch, beam, 4] x) => (float[batch, beam, 4] y) { y = Neg (x) }
        """
    )
    with pytest.raises(StaticShapeError, match=r"input 'x' dim 1 is symbolic \('beam'\).*dims="):
        PinStaticShapes(1, 4).run(g)
    assert PinStaticShapes(1, 4, dims={"beam": 2}).run(g).stats == {"pinned_dims": 4}


def test_a_data_dependent_dim_cannot_be_pinned() -> None:
    g = Graph.parse(
        """
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[batch, 4] x) => (int64[2, K] y, int64[2] s)
        {
            y = NonZero (x)
            s = Shape (y)
        }
        """
    )
    with pytest.raises(StaticShapeError) as e:
        PinStaticShapes(1, 4).run(g)
    assert "y dim 1 is still symbolic ('K')" in str(e.value)
    assert "Shape node remains" in str(e.value) and "its input 'y'" in str(e.value)


def test_inconsistent_sizes_fail_with_the_sizes_named() -> None:
    g = Graph.parse(
        """
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[batch, seq_len] a, float[batch, past_len] b) => (float[batch, total_len] c)
        {
            c = Concat <axis = 1> (b, a)
        }
        """
    )
    with pytest.raises(StaticShapeError, match="total_len=6"):
        PinStaticShapes(2, 3, dims={"past_len": 2, "total_len": 6}).run(g)


# --------------------------------------------------------------------------- real graphs


def _fold_then_pin(path: Path, **pin: Any) -> Graph:
    graph = Graph.load(path)
    for p in (FoldConstants(), Cleanup(), PinStaticShapes(**pin), Cleanup()):
        graph = p.run(graph).graph
    graph.check()
    return graph


def test_optimum_export_pins_with_its_own_dim_names() -> None:
    pinned = _fold_then_pin(OPTIMUM, batch_size=1, seq_len=4, dims={"past_sequence_length": 3})
    _static_io(pinned)
    shapes = {t.name: t.shape for t in pinned.inputs + pinned.outputs}
    assert shapes["attention_mask"] == [1, 7] and shapes["present.1.value"] == [1, 4, 7, 16]
    assert_same_outputs(Graph.load(OPTIMUM), pinned, dims={"batch_size": 1, "sequence_length": 4, "past_sequence_length": 3,
                                                           "past_sequence_length + sequence_length": 7})  # fmt: skip


@pytest.fixture(scope="module", params=[("dynamo", None), ("torchscript", 14)], ids=["dynamo", "torchscript14"])
def tiny_export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    exporter, opset = request.param
    _, model = random_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32)
    path = tmp_path_factory.mktemp(exporter) / "model.onnx"
    export_model(model, path, exporter=exporter, opset=opset)
    return path


def test_real_export_pins_and_matches_the_dynamic_graph(tiny_export: Path) -> None:
    pinned = _fold_then_pin(tiny_export, batch_size=1, seq_len=4, dims={"past_len": 3, "total_len": 7})
    _static_io(pinned)
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 50, (1, 4)),
        "attention_mask": np.ones((1, 7), np.int64),
        "position_ids": np.arange(3, 7)[None],
        **{f"past_{kv}.{i}": rng.standard_normal((1, 2, 3, 8)).astype(np.float32) for i in range(2) for kv in ("key", "value")},
    }
    want = session(Graph.load(tiny_export)).run(None, feeds)
    got = session(pinned).run(None, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
