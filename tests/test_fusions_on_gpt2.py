"""fuse-layer-norm and fuse-gelu on real exports of a small random GPT-2.

TorchScript at opset 14 decomposes both LayerNorm and GELU; dynamo keeps
LayerNorm native (fuse-layer-norm is a no-op there) and decomposes GELU.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from helpers import session

from passes import Cleanup, FuseGelu, FuseLayerNorm
from qgraph import Graph, PassManager, Report

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

N_LAYER = 2
BATCH, SEQ = 2, 5


class LogitsOnly(torch.nn.Module):  # type: ignore[misc]
    """input_ids and attention_mask in, logits out (TorchScript export needs the mask)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.fixture(scope="module")
def gpt2() -> tuple[Any, dict[str, np.ndarray], np.ndarray]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=N_LAYER, n_head=2, n_embd=16, vocab_size=50, n_positions=32)
    model = LogitsOnly(transformers.GPT2LMHeadModel(config)).eval()
    ids = torch.randint(0, 50, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    with torch.no_grad():
        logits = model(ids, mask).numpy()
    return model, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, logits


def export(model: Any, feeds: dict[str, np.ndarray], path: Path, **kwargs: Any) -> Graph:
    args = tuple(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), input_names=["input_ids", "attention_mask"], output_names=["logits"], **kwargs)
    return Graph.from_proto(onnx.load(str(path)))


@pytest.fixture(scope="module")
def torchscript(gpt2: Any, tmp_path_factory: pytest.TempPathFactory) -> Graph:
    model, feeds, _ = gpt2
    return export(model, feeds, tmp_path_factory.mktemp("ts") / "gpt2.onnx", dynamo=False, opset_version=14)


@pytest.fixture(scope="module")
def dynamo(gpt2: Any, tmp_path_factory: pytest.TempPathFactory) -> Graph:
    model, feeds, _ = gpt2
    return export(model, feeds, tmp_path_factory.mktemp("dynamo") / "gpt2.onnx", dynamo=True, external_data=False)


def fuse(graph: Graph) -> tuple[Graph, Report]:
    """fuse-layer-norm, fuse-gelu and cleanup in check mode, on a copy."""
    return PassManager([FuseLayerNorm(), FuseGelu(), Cleanup()], check=True).run(Graph.from_proto(graph.to_proto()))


def assert_fused_and_equal(before: Graph, after: Graph, gpt2: Any) -> None:
    _, feeds, torch_logits = gpt2
    ops = after.op_counts()
    assert ops["LayerNormalization"] == 2 * N_LAYER + 1
    assert ops["Gelu"] == N_LAYER
    assert not {"Tanh", "ReduceMean", "Pow", "Sqrt", "Erf"} & set(ops), ops
    assert after.opset() == 20
    (ref,) = session(before).run(["logits"], feeds)
    (out,) = session(after).run(["logits"], feeds)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out, torch_logits, atol=1e-4, rtol=1e-4)


def test_torchscript_opset14_export(torchscript: Graph, gpt2: Any) -> None:
    assert torchscript.opset() == 14 and "LayerNormalization" not in torchscript.op_counts()
    after, report = fuse(torchscript)
    assert report["fuse-layer-norm"].stats == {"layer_norm": 2 * N_LAYER + 1}
    assert report["fuse-gelu"].stats == {"gelu_tanh": N_LAYER}
    assert_fused_and_equal(torchscript, after, gpt2)


def test_dynamo_export(dynamo: Graph, gpt2: Any) -> None:
    assert dynamo.op_counts()["LayerNormalization"] == 2 * N_LAYER + 1
    after, report = fuse(dynamo)
    assert report["fuse-layer-norm"].modified is False and report["fuse-layer-norm"].stats == {}
    assert report["fuse-gelu"].stats == {"gelu_tanh": N_LAYER}
    assert_fused_and_equal(dynamo, after, gpt2)


def test_fusing_twice_changes_nothing(torchscript: Graph) -> None:
    once, _ = fuse(torchscript)
    _, report = fuse(once)
    assert not report["fuse-layer-norm"].modified and not report["fuse-gelu"].modified
