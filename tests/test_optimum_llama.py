"""The real Optimum export of a Llama (tests/data/optimum-llama-2l: optimum-cli export onnx --task
text-generation-with-past, a graph qgraph did not make: Optimum's names, its own mask and rotary subgraphs, grouped KV
heads repeated after the cache) through ``qgraph optimize``: the retained-state contract, and Hugging Face's logits
and greedy tokens from the folder's weights (hf/), symbolic and compiled for cpu (and its tokens on qnn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import cli_command, generate_recording_logits, hf_greedy, hf_logits_along, run_all

from qgraph.compile import compile_model
from qgraph.ir.contract import CacheSpec, teacher_forced_logits
from qgraph.ir.graph import Graph
from qgraph.runtime import Runtime
from qgraph.targets import qnn

torch = pytest.importorskip("torch")

FIXTURE = Path(__file__).parent / "data" / "optimum-llama-2l"
CTX = 32
PREFILL = 8
ATOL = 1e-3
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16  # the fixture's README


@pytest.fixture(scope="module")
def hf() -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(FIXTURE / "hf").eval()


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("opt") / "optimized.onnx"
    (res,) = run_all([cli_command("optimize", str(FIXTURE / "model.onnx"), "-o", str(out), "--ctx-len", str(CTX), "--check")])
    assert res.returncode == 0, res.stderr
    assert "rms_norm=5" in res.stdout and "layers=2" in res.stdout, res.stdout
    return out


def test_the_optimized_graph_is_the_contract(optimized: Path) -> None:
    g = Graph.load(optimized)
    names = ["input_ids", "position_ids"] + [f"past_{r}.{i}" for i in range(LAYERS) for r in ("key", "value")]
    assert [t.name for t in g.inputs] == names
    assert [t.name for t in g.outputs] == ["logits"] + [f"{n}_RetainedState" for n in names[2:]]
    for t in g.inputs[2:] + g.outputs[1:]:
        assert isinstance(t.shape[0], str) and list(t.shape[1:]) == [KV_HEADS, CTX, HEAD_DIM], t.name  # batch stays symbolic
    ops = g.op_counts()
    assert ops["RMSNormalization"] == 2 * LAYERS + 1 and "ReduceMean" not in ops and "Pow" not in ops


def test_teacher_forced_logits_match_hugging_face(optimized: Path, hf: Any) -> None:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(optimized), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]

    def step(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, feeds)))

    cache = CacheSpec([t.name for t in sess.get_inputs()[2:]], (2, KV_HEADS, CTX, HEAD_DIM), np.dtype(np.float32))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 500, n).tolist() for n in (5, 13)]  # one longer than the prefill chunk, rows padded
    conts = [rng.integers(3, 500, n).tolist() for n in (4, 2)]
    got = teacher_forced_logits(step, step, cache, prompts, conts, PREFILL)
    for prompt, cont, rows in zip(prompts, conts, got):
        with torch.no_grad():
            want = hf(torch.tensor([prompt + cont])).logits[0].numpy()
        for k, row in enumerate(rows):
            np.testing.assert_allclose(row, want[len(prompt) - 1 + k], atol=ATOL, rtol=0, err_msg=f"step {k}")


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_for_cpu_it_generates_hugging_faces_tokens(optimized: Path, hf: Any, batch: int, tmp_path: Path) -> None:
    art = compile_model(optimized, "cpu", tmp_path / "cpu", prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=batch)
    for graph in ("prefill", "decode"):  # each layer's cache writes and grouped attention: one kernel (a prefill at batch 1 only)
        ops = [n.op_type for n in onnx.load(str(art / f"{graph}.onnx"), load_external_data=False).graph.node]
        assert ops.count("GroupQueryAttention") == (LAYERS if graph == "decode" or batch == 1 else 0), (graph, ops)
    prompts = [[1, 17, 42, 9], [1, 7, 300, 12, 11, 10, 9, 8, 7, 6, 5]][: 2 if batch > 1 else 1] + [[1, 250, 251]]
    out, logits = generate_recording_logits(Runtime(art), prompts, 10, eos_token_id=hf.config.eos_token_id)
    for prompt, toks, got in zip(prompts, out.tokens, logits, strict=True):
        assert toks == hf_greedy(hf, prompt, 10, distinct=3)
        for k, (g, w) in enumerate(zip(got, hf_logits_along(hf, prompt, toks), strict=True)):
            np.testing.assert_allclose(g, w, atol=ATOL, rtol=0, err_msg=f"step {k}")


@pytest.mark.skipif(not qnn.qnn_available(), reason="onnxruntime-qnn is not installed (pip install 'qgraph[qnn]')")
def test_on_the_qnn_htp_simulator_it_generates_hugging_faces_tokens(optimized: Path, hf: Any, tmp_path: Path) -> None:
    # Every node on QNN (the compile fails otherwise); the HTP computes in fp16, so tokens, not logits, are compared.
    art = compile_model(optimized, "qnn", tmp_path / "qnn", prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=1)
    prompt = [1, 17, 42, 9]
    assert Runtime(art).generate([prompt], max_new_tokens=8).tokens[0] == hf_greedy(hf, prompt, 8, distinct=3)
