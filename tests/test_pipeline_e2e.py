"""The default pipeline end to end: raw exports in, the retained-state contract out,
Hugging Face's logits matched at every step (prefill with padding, then decode).

Sources: the dynamo exporter, TorchScript at opset 14 (decomposed LayerNorm) and at
its default opset, a copy renamed to Optimum's convention, and the real Optimum export
in tests/data/optimum-gpt2-2l (made by Hugging Face's exporter, not by qgraph).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import random_gpt2

from qgraph.ir.contract import CacheSpec, teacher_forced_logits
from qgraph.ir.graph import Graph
from qgraph.pipeline.optimize import optimize
from qgraph.pipeline.stages import SPECIALIZE, expand
from qgraph.targets import get_target

torch = pytest.importorskip("torch")

OPTIMUM_DIR = Path(__file__).parent / "data" / "optimum-gpt2-2l"
CTX = 32
PREFILL = 8
ATOL = 1e-3


def _randomize(model: Any, seed: int = 1) -> Any:
    """Random LayerNorm weights and biases, so a fusion that drops gamma or beta shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return model


@pytest.fixture(scope="module")
def hf_model() -> Any:
    config, model = random_gpt2(n_layer=2, n_head=3, n_embd=24, vocab_size=397, n_positions=64)
    return _randomize(model)


def _rename_to_optimum(src: Path, dst: Path) -> Path:
    """The raw export with Optimum's IO names (past_key_values.{i}.key -> present.{i}.key)."""
    model = onnx.load(str(src))
    names = {}
    for v in list(model.graph.input) + list(model.graph.output):
        for role in ("key", "value"):
            for kind, new in (("past", "past_key_values.{}." + role), ("present", "present.{}." + role)):
                prefix = f"{kind}_{role}."
                if v.name.startswith(prefix):
                    names[v.name] = new.format(v.name[len(prefix) :])
    for v in list(model.graph.input) + list(model.graph.output):
        v.name = names.get(v.name, v.name)
    for n in model.graph.node:
        n.input[:] = [names.get(x, x) for x in n.input]
        n.output[:] = [names.get(x, x) for x in n.output]
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def sources(hf_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    from qgraph.frontend.export import export_model

    d = tmp_path_factory.mktemp("exports")
    out = {
        "dynamo": export_model(hf_model, d / "dynamo.onnx", exporter="dynamo").path,
        "torchscript-14": export_model(hf_model, d / "ts14.onnx", exporter="torchscript", opset=14).path,
        "torchscript": export_model(hf_model, d / "ts.onnx", exporter="torchscript").path,
    }
    out["optimum-names"] = _rename_to_optimum(out["torchscript"], d / "optimum_names.onnx")
    result = {k: (v, hf_model) for k, v in out.items()}
    from transformers import GPT2LMHeadModel

    result["optimum-export"] = (OPTIMUM_DIR / "model.onnx", GPT2LMHeadModel.from_pretrained(OPTIMUM_DIR / "hf").eval())
    return result


def _session(graph: Graph) -> Any:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(graph.to_proto_inline().SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(names, feeds)))


def _cache(graph: Graph, batch: int) -> CacheSpec:
    kv = [t for t in graph.inputs if t.name.startswith("past_")]
    shape = tuple(batch if not isinstance(d, int) else d for d in kv[0].shape)
    return CacheSpec([t.name for t in kv], shape, np.dtype(np.float32))


def _hf_logits(model: Any, prompts: list[list[int]], conts: list[list[int]]) -> list[list[np.ndarray]]:
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, conts):
            logits = model(input_ids=torch.tensor([p + c])).logits[0].numpy()
            out.append([logits[len(p) - 1 + k] for k in range(len(c) + 1)])
    return out


def _case(vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (5, 11)]  # one longer than the prefill length
    conts = [rng.integers(0, vocab, n).tolist() for n in (3, 2)]  # rows finish at different steps
    return prompts, conts


def _max_diff(got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> float:
    assert [len(r) for r in got] == [len(r) for r in want]
    return max(float(np.abs(g - w).max()) for gr, wr in zip(got, want) for g, w in zip(gr, wr))


SOURCES = ["dynamo", "torchscript-14", "torchscript", "optimum-names", "optimum-export"]


@pytest.mark.parametrize("source", SOURCES)
def test_symbolic_pipeline_matches_hugging_face(sources: dict[str, tuple[Path, Any]], source: str) -> None:
    path, model = sources[source]
    graph = Graph.load(path)
    report = optimize(graph, ctx_len=CTX, check=True)
    n_layer = model.config.n_layer
    ops = graph.op_counts()
    assert ops["LayerNormalization"] == 2 * n_layer + 1, report.table()
    assert ops["Gelu"] == n_layer and "Tanh" not in ops and "ReduceMean" not in ops and "Pow" not in ops
    assert "attention_mask" not in [t.name for t in graph.inputs]
    assert [t.name for t in graph.outputs][:3] == ["logits", "past_key.0_RetainedState", "past_value.0_RetainedState"]
    step = _session(graph)
    prompts, conts = _case(model.config.vocab_size)
    got = teacher_forced_logits(step, step, _cache(graph, 2), prompts, conts, PREFILL)
    diff = _max_diff(got, _hf_logits(model, prompts, conts))
    assert diff < ATOL, f"{source}: max |logits - HF| = {diff}"


def _pinned_max_diff(graphs: dict[str, Graph], model: Any) -> float:
    """Max |logits - HF| driving the pinned prefill and decode graphs through the contract."""
    prompts, conts = _case(model.config.vocab_size)
    got = teacher_forced_logits(
        _session(graphs["prefill"]), _session(graphs["decode"]), _cache(graphs["decode"], 2), prompts, conts, PREFILL
    )
    return _max_diff(got, _hf_logits(model, prompts, conts))


@pytest.mark.parametrize("source", ["dynamo", "torchscript-14", "optimum-export"])
def test_pinned_prefill_and_decode_match_hugging_face(sources: dict[str, tuple[Path, Any]], source: str) -> None:
    path, model = sources[source]
    graphs = {}
    for kind, seq in (("prefill", PREFILL), ("decode", 1)):
        g = Graph.load(path)
        optimize(g, ctx_len=CTX, batch_size=2, seq_len=seq)
        assert "Shape" not in g.op_counts()
        for t in g.inputs + g.outputs:
            assert all(isinstance(d, int) for d in t.shape), f"{kind}: {t.name} has shape {t.shape}"
        graphs[kind] = g
    assert list(graphs["prefill"].outputs[0].shape) == [2, 1, model.config.vocab_size]
    diff = _pinned_max_diff(graphs, model)
    assert diff < ATOL, f"{source} pinned: max |logits - HF| = {diff}"


def _cpu_pinned(path: Path, batch: int, extra: tuple[str, ...] = ()) -> dict[str, tuple[Graph, Any]]:
    """Prefill and decode at ``batch`` through the declared pipeline: the rewrite, then the specialization stage
    with the cpu target's slots filled (``extra`` after simplify-shapes): kind -> (graph, report)."""
    specialize = expand(SPECIALIZE, get_target("cpu"))
    at = specialize.index("simplify-shapes") + 1
    passes = [*specialize[:at], *extra, *specialize[at:]]
    out = {}
    for kind, seq in (("prefill", PREFILL), ("decode", 1)):
        g = Graph.load(path)
        optimize(g, ctx_len=CTX)
        out[kind] = (g, optimize(g, passes, ctx_len=CTX, batch_size=batch, seq_len=seq, check=True))
    return out


@pytest.mark.parametrize("source", SOURCES)
def test_fused_attention_matches_hugging_face(sources: dict[str, tuple[Path, Any]], source: str) -> None:
    """The cpu target's pinned passes (fuse-attention, simplify-shapes with its 2-D rows, fuse-decode-attention)
    and fuse-skip-layer-norm (a pass the target no longer runs) on every exporter's pinned graphs: same logits as HF.

    The caches are fed back through separate buffers here (plain ``session.run``), the case in which
    GroupQueryAttention leaves the slots after the step's undefined: no later step may read them."""
    path, model = sources[source]
    graphs = {}
    for kind, (g, report) in _cpu_pinned(path, 2, ("fuse-skip-layer-norm",)).items():
        seq = 1 if kind == "decode" else PREFILL
        ops = g.op_counts()
        # Prefill at batch 2 keeps MultiHeadAttention; at one token each layer's attention and cache writes are one op.
        fused = "GroupQueryAttention" if seq == 1 else "MultiHeadAttention"
        assert ops[fused] == model.config.n_layer and "Softmax" not in ops, report.table()
        assert ("ScatterND" in ops) is (seq > 1), report.table()
        # Every norm reads a sum (the first, the embeddings'): each takes its Add with it.
        assert ops["SkipLayerNormalization"] == 2 * model.config.n_layer + 1 and "LayerNormalization" not in ops, report.table()
        if seq == 1:  # one token: the gather of the valid new tokens is the identity
            assert "GatherElements" not in ops, report.table()
        graphs[kind] = g
    diff = _pinned_max_diff(graphs, model)
    assert diff < ATOL, f"{source} with fused attention: max |logits - HF| = {diff}"


@pytest.mark.parametrize("source", SOURCES)
def test_prompt_chunks_at_batch_one_match_hugging_face(sources: dict[str, tuple[Path, Any]], source: str) -> None:
    """At batch 1 the cpu target's fuse-decode-attention also rewrites the prefill: each prompt chunk's cache
    writes and attention become GroupQueryAttention. Prompts of one chunk, two chunks (the last padded) and
    exactly two chunks, driven as the runtime chunks them, through separate buffers (slots after the last
    valid position are undefined there): same logits as HF."""
    path, model = sources[source]
    graphs = {}
    for kind, (g, report) in _cpu_pinned(path, 1).items():
        ops = g.op_counts()
        assert ops["GroupQueryAttention"] == model.config.n_layer, report.table()
        assert not {"ScatterND", "MultiHeadAttention", "Softmax"} & set(ops), report.table()
        graphs[kind] = g
    prompts, conts = _case(model.config.vocab_size)
    prompts.append(list(range(1, 2 * PREFILL + 1)))
    conts.append(conts[0])
    for prompt, cont in zip(prompts, conts):
        got = teacher_forced_logits(_session(graphs["prefill"]), _session(graphs["decode"]), _cache(graphs["decode"], 1),
                                    [prompt], [cont], PREFILL)  # fmt: skip
        diff = _max_diff(got, _hf_logits(model, [prompt], [cont]))
        assert diff < ATOL, f"{source}, prompt of {len(prompt)} at batch 1: max |logits - HF| = {diff}"
