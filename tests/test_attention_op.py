"""Exports with the standard ONNX ``Attention`` op (dynamo at ``--opset 23`` and ``24``) through every stage:
retain-kv-cache, fuse-attention and fuse-decode-attention on cpu, legalize-qnn and the HTP on qnn, qaic's dry
run and the pass-debugging tool, with Hugging Face's tokens and logits on a random GPT-2 whose greedy output
varies (initializer_range 0.3: a cache or mask bug changes the tokens).

What dynamo writes (checked below): per layer one ``Attention`` (opset 23) reading the Concat-grown caches as
K and V, with a bool mask built from ``attention_mask``; opset 24 is the same graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import random_gpt2

from qgraph.compile import compile_model
from qgraph.ir.contract import CacheSpec, teacher_forced_logits
from qgraph.ir.graph import Graph
from qgraph.pipeline.optimize import optimize
from qgraph.pipeline.stages import SPECIALIZE, expand
from qgraph.runtime import Runtime
from qgraph.targets import get_target, qnn

torch = pytest.importorskip("torch")

OPSETS = (23, 24)
CTX = 48
PREFILL = 8
ATOL = 1e-3
PROMPTS = [[5, 17, 42, 8, 99], [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [100, 3, 9, 9, 1]]  # one longer than PREFILL
NEW = 10


@pytest.fixture(scope="module")
def hf() -> Any:
    _, model = random_gpt2(initializer_range=0.3)
    return model


@pytest.fixture(scope="module")
def exports(hf: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    from qgraph.frontend.export import export_model

    d = tmp_path_factory.mktemp("attention-op")
    return {opset: export_model(hf, d / f"opset{opset}.onnx", exporter="dynamo", opset=opset).path for opset in OPSETS}


@pytest.fixture(scope="module")
def greedy(hf: Any) -> list[list[int]]:
    """Hugging Face's greedy tokens per prompt; they vary, so a wrong slot or mask shows. Each step's top-2 gap is
    over 0.08, more than twice the HTP's fp16 error (0.035 measured), so the HTP must pick the same tokens too."""
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            res = hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None,
                              output_scores=True, return_dict_in_generate=True)  # fmt: skip
            out.append(res.sequences[0, len(p) :].tolist())
            assert min(float(torch.topk(s[0], 2).values.diff().abs()) for s in res.scores) > 0.08
    assert all(len(set(t)) >= 4 for t in out), out
    return out


def _hf_logits(hf: Any, greedy: list[list[int]]) -> list[list[np.ndarray]]:
    """HF's logits after each prompt and after each of its greedy tokens (the last one's excluded)."""
    out = []
    with torch.no_grad():
        for p, c in zip(PROMPTS, greedy):
            logits = hf(input_ids=torch.tensor([p + c])).logits[0].numpy()
            out.append([logits[len(p) - 1 + k] for k in range(len(c))])
    return out


def _step(session: Any) -> Any:
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds), strict=True))


def _cpu(graph: Graph) -> Any:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return _step(ort.InferenceSession(graph.to_proto_inline().SerializeToString(), opts, providers=["CPUExecutionProvider"]))


def _cache(graph: Graph, batch: int) -> CacheSpec:
    kv = [t for t in graph.inputs if t.name.startswith("past_")]
    return CacheSpec([t.name for t in kv], tuple(batch if not isinstance(d, int) else d for d in kv[0].shape), np.dtype(np.float32))


def _forced(prefill: Any, decode: Any, cache: CacheSpec, greedy: list[list[int]]) -> list[list[np.ndarray]]:
    """Logits after each prompt (chunked by PREFILL, padded) and each greedy token, all prompts in one batch."""
    return teacher_forced_logits(prefill, decode, cache, PROMPTS, [c[:-1] for c in greedy], PREFILL)


def _max_diff(got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> float:
    assert [len(r) for r in got] == [len(r) for r in want]
    return max(float(np.abs(g - w).max()) for gr, wr in zip(got, want) for g, w in zip(gr, wr))


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.mark.parametrize("opset", OPSETS)
def test_dynamo_writes_one_attention_op_per_layer_with_a_bool_mask(exports: dict[int, Path], opset: int) -> None:
    g = Graph.load(exports[opset])
    assert g.opset() == opset and g.op_counts()["Attention"] == 2 and "Softmax" not in g.op_counts()
    for att in g.nodes_by_op("Attention"):
        assert [t.name for t in att.inputs[1:3]] == [f"present_key.{att.inputs[1].name[-1]}", f"present_value.{att.inputs[1].name[-1]}"]
        assert g.producer(att.inputs[1]).op == "Concat" and att.inputs[3].dtype == np.bool_


@pytest.mark.parametrize("opset", OPSETS)
def test_optimize_keeps_the_attention_op_and_matches_hugging_face(
    exports: dict[int, Path], hf: Any, greedy: list[list[int]], opset: int
) -> None:
    g = Graph.load(exports[opset])
    report = optimize(g, ctx_len=CTX, check=True)
    assert report["retain-kv-cache"].stats["attention_ops"] == 2, report.table()
    assert [t.name for t in g.inputs][:3] == ["input_ids", "position_ids", "past_key.0"]
    assert g.op_counts()["Attention"] == 2 and "attention_mask" not in [t.name for t in g.inputs]
    got = _forced(_cpu(g), _cpu(g), _cache(g, len(PROMPTS)), greedy)
    assert _max_diff(got, _hf_logits(hf, greedy)) < ATOL
    assert [[int(x.argmax()) for x in row] for row in got] == greedy


def _cpu_pinned(path: Path, batch: int) -> dict[str, Graph]:
    """The rewrite, then the cpu target's specialization stage, for prefill and decode."""
    out = {}
    for kind, seq in (("prefill", PREFILL), ("decode", 1)):
        g = Graph.load(path)
        optimize(g, ctx_len=CTX)
        optimize(g, expand(SPECIALIZE, get_target("cpu")), ctx_len=CTX, batch_size=batch, seq_len=seq, check=True)
        out[kind] = g
    return out


@pytest.mark.parametrize("opset", OPSETS)
def test_cpu_fuses_the_attention_op_and_matches_hugging_face(
    exports: dict[int, Path], hf: Any, greedy: list[list[int]], opset: int
) -> None:
    """fuse-attention turns the op into MultiHeadAttention and fuse-decode-attention then makes GroupQueryAttention,
    as for the MatMul/Softmax spelling; the pinned graphs give HF's logits."""
    graphs = _cpu_pinned(exports[opset], len(PROMPTS))
    assert graphs["prefill"].op_counts()["MultiHeadAttention"] == 2 and graphs["decode"].op_counts()["GroupQueryAttention"] == 2
    assert not {"Attention", "Softmax"} & (set(graphs["prefill"].op_counts()) | set(graphs["decode"].op_counts()))
    got = _forced(_cpu(graphs["prefill"]), _cpu(graphs["decode"]), _cache(graphs["decode"], len(PROMPTS)), greedy)
    assert _max_diff(got, _hf_logits(hf, greedy)) < ATOL


@pytest.mark.parametrize("opset", OPSETS)
def test_cpu_artifacts_generate_hugging_face_tokens(exports: dict[int, Path], greedy: list[list[int]], opset: int, tmp_path: Path) -> None:
    """Batches of two rows (padding, a prompt longer than the prefill chunk) and of one row (prefill chunks as
    GroupQueryAttention too)."""
    for batch in (2, 1):
        art = compile_model(exports[opset], "cpu", tmp_path / f"cpu{batch}", prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=batch)
        assert _ops(art / "decode.onnx").count("GroupQueryAttention") == 2
        assert _ops(art / "prefill.onnx").count("GroupQueryAttention" if batch == 1 else "MultiHeadAttention") == 2
        assert Runtime(art).generate(PROMPTS, max_new_tokens=NEW).tokens == greedy


needs_qnn = pytest.mark.skipif(not qnn.qnn_available(), reason="onnxruntime-qnn is not installed (pip install 'qgraph[qnn]')")


@needs_qnn
@pytest.mark.parametrize("opset", OPSETS)
def test_qnn_runs_every_node_on_the_htp_with_hugging_face_tokens(
    exports: dict[int, Path], hf: Any, greedy: list[list[int]], opset: int, tmp_path: Path
) -> None:
    """The position mask is additive float, which QNN takes in the Attention op (a bool mask it rejects): the compile
    places every node on QNN (it fails otherwise). The HTP computes in fp16: logits within 1% of their range."""
    art = compile_model(exports[opset], "qnn", tmp_path / "qnn", prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=len(PROMPTS))
    assert Runtime(art).generate(PROMPTS, max_new_tokens=NEW).tokens == greedy
    sessions = {name: _step(qnn.create_session(art / f"{name}.onnx")) for name in ("prefill", "decode")}
    kv = [i for i in qnn.create_session(art / "decode.onnx").get_inputs() if i.name.startswith("past_")]
    cache = CacheSpec([i.name for i in kv], tuple(int(d) for d in kv[0].shape), np.dtype(np.float32))
    got, want = _forced(sessions["prefill"], sessions["decode"], cache, greedy), _hf_logits(hf, greedy)
    scale = max(float(np.abs(w).max()) for row in want for w in row)
    assert _max_diff(got, want) < 0.01 * scale  # measured: 0.035 of 7.8 (0.45%)


def test_qaic_dry_run_writes_the_attention_op_with_the_position_mask(exports: dict[int, Path], tmp_path: Path) -> None:
    art = compile_model(exports[23], "qaic", tmp_path / "qaic", prefill_seq_len=PREFILL, ctx_len=CTX, dry_run=True)
    g = Graph.load(art / "model.onnx")
    assert [t.name for t in g.inputs][:2] == ["input_ids", "position_ids"] and g.op_counts()["Attention"] == 2
    for att in g.nodes_by_op("Attention"):
        mask = g.producer(att.inputs[3])
        assert mask.op == "Where" and g.const_value(mask.inputs[2]).dtype == np.float32
    assert "past_key.0_RetainedState" in (art / "custom_io.yaml").read_text()


def test_the_debug_tool_finds_no_bad_pass(exports: dict[int, Path]) -> None:
    from qgraph.devtools.debug import debug_passes

    report = debug_passes(exports[23], ctx_len=CTX, out_dir=None, atol=ATOL, threads=1)
    assert report.first_bad_pass is None, report.table()
    assert report["retain-kv-cache"].signature == "retained" and report["retain-kv-cache"].stats["attention_ops"] == 2
