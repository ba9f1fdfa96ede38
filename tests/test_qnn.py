"""The QNN HTP target: legalize-qnn, offline EP-context compile, placement checks,
and logits on the HTP (the x86 simulator here) against Hugging Face and ORT CPU.

The tests that compile or run need onnxruntime-qnn (the ``qnn`` extra) and skip
without it; the legalize-qnn rewrites are checked on ORT CPU everywhere.

Tolerance: the HTP computes float32 graphs in fp16 (unit roundoff 2**-11, about
4.9e-4). The tiny model's logits stay below about 1 in magnitude, and the
measured worst difference from Hugging Face over a padded prefill and 8 decode
steps was 4e-4 to 5e-4 (ORT CPU: about 1e-7), so ATOL = 1e-2 leaves a 20x margin
and still catches a real error (a wrong cache slot or mask moves logits by
about 1e-1 here). The error grows with the weights' scale: with
initializer_range 0.1 or 0.2 instead of 0.02 it was 8e-3 and 1e-2 (logits up to
2.2 and 3.8), so this tolerance is for this model, not a general one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from helpers import random_gpt2

from passes.legalize_qnn import LegalizeQnn
from qgraph.errors import MissingDependencyError, PlacementError, StaticShapeError
from qgraph.ir.contract import CacheSpec, teacher_forced_logits
from qgraph.ir.graph import Graph
from qgraph.pipeline.manager import PassManager
from qgraph.pipeline.optimize import optimize
from qgraph.targets import qnn

needs_qnn = pytest.mark.skipif(not qnn.qnn_available(), reason="onnxruntime-qnn is not installed (pip install 'qgraph[qnn]')")

CTX = 32
PREFILL = 4
ATOL = 1e-2
REPO = Path(__file__).resolve().parents[1]


def _cpu(graph: Graph) -> Any:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(graph.to_proto_inline().SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _step(session: Any) -> Any:
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds), strict=True))


def _legalized(text: str) -> tuple[Graph, Graph]:
    before = Graph.parse(text)
    after = Graph.parse(text)
    PassManager([LegalizeQnn()], check=True).run(after)
    after.cleanup()
    return before, after


# ------------------------------------------------------------------ legalize-qnn, on ORT CPU

# Hugging Face's padding-mask lookup: GatherND on bool data with rank-5 constant indices.
GATHERND_BOOL = """
<ir_version: 10, opset_import: ["" : 18]>
g (int64[1,8] mask, float[1,1,1,8] scores) => (float[1,1,1,8] out) {
    b = Cast<to=9>(mask)
    idx = Constant<value=int64[1,1,1,8,2] {0,7, 0,1, 0,2, 0,3, 0,-4, 0,5, 0,6, 0,0}>()
    picked = GatherND(b, idx)
    zero = Constant<value=float {0.0}>()
    low = Constant<value=float {-10000.0}>()
    add = Where(picked, zero, low)
    out = Add(scores, add)
}
"""

# The same lookup with indices computed at run time.
GATHERND_BOOL_DYNAMIC = """
<ir_version: 10, opset_import: ["" : 18]>
g (bool[1,8] mask, int64[1,4,2] idx) => (bool[1,4] out) {
    out = GatherND(mask, idx)
}
"""

ATTENTION_BOOL = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[1,2,4,8] q, float[1,2,6,8] k, float[1,2,6,8] v, bool[4,6] m) => (float[1,2,4,8] y) {
    y = Attention(q, k, v, m)
}
"""

# Phi-3's partial rotary as TorchScript exports it with nothing to pass: cat(rotated, q[..., 8:]) on head_dim 8.
EMPTY_CONCAT_OPERAND = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[1,2,3,8] q) => (float[1,2,3,8] y) {
    start = Constant<value=int64[1] {8}>()
    end = Constant<value=int64[1] {9223372036854775807}>()
    axis = Constant<value=int64[1] {-1}>()
    rest = Slice(q, start, end, axis)
    rot = Neg(q)
    y = Concat<axis=-1>(rot, rest)
}
"""


def _gathernd_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"mask": np.array([[0, 1, 1, 0, 1, 1, 0, 1]], np.int64), "scores": rng.standard_normal((1, 1, 1, 8)).astype(np.float32)}


def _attention_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 2, 4, 8), (1, 2, 6, 8), (1, 2, 6, 8)))
    return {"q": q, "k": k, "v": v, "m": np.tril(np.ones((4, 6), bool), 2)}  # every query sees a key


def test_gathernd_with_constant_indices_becomes_gather() -> None:
    before, after = _legalized(GATHERND_BOOL)
    ops = after.op_counts()
    assert "GatherND" not in ops and ops["Gather"] == 1 and ops["Reshape"] == 1
    feeds = _gathernd_feeds()
    want = _cpu(before).run(None, feeds)[0]
    got = _cpu(after).run(None, feeds)[0]
    np.testing.assert_array_equal(got, want)


def test_gathernd_bool_with_runtime_indices_gathers_int32() -> None:
    before, after = _legalized(GATHERND_BOOL_DYNAMIC)
    nd = after.nodes_by_op("GatherND")[0]
    assert nd.inputs[0].dtype == np.int32 and after.op_counts()["Cast"] == 2
    feeds = {"mask": np.array([[1, 0, 1, 1, 0, 0, 1, 0]], bool), "idx": np.array([[[0, 1], [0, 2], [0, -2], [0, 7]]], np.int64)}
    np.testing.assert_array_equal(_cpu(after).run(None, feeds)[0], _cpu(before).run(None, feeds)[0])


def test_attention_bool_mask_becomes_additive() -> None:
    before, after = _legalized(ATTENTION_BOOL)
    att = after.nodes_by_op("Attention")[0]
    assert att.inputs[3].dtype == np.float32 and after.op_counts()["Where"] == 1
    feeds = _attention_feeds()
    np.testing.assert_allclose(_cpu(after).run(None, feeds)[0], _cpu(before).run(None, feeds)[0], atol=1e-6)


def test_empty_concat_operand_is_dropped() -> None:
    before, after = _legalized(EMPTY_CONCAT_OPERAND)
    assert "Slice" not in after.op_counts() and len(after.nodes_by_op("Concat")[0].inputs) == 1
    q = np.random.default_rng(0).standard_normal((1, 2, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(_cpu(after).run(None, {"q": q})[0], _cpu(before).run(None, {"q": q})[0])


@pytest.mark.parametrize("text", [GATHERND_BOOL, GATHERND_BOOL_DYNAMIC, ATTENTION_BOOL, EMPTY_CONCAT_OPERAND])
def test_legalize_qnn_is_idempotent(text: str) -> None:
    _, once = _legalized(text)
    result = LegalizeQnn().run(once)
    assert not result.modified and result.stats == {}


# ------------------------------------------------------------------ the tiny GPT-2, compiled for QNN


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny random GPT-2, exported, optimized and pinned (prefill and decode), legalized."""
    pytest.importorskip("torch")
    from qgraph.frontend.export import export_model

    d = tmp_path_factory.mktemp("qnn-gpt2")
    _, model = random_gpt2(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=CTX)
    raw = export_model(model, d / "raw.onnx").path
    out: dict[str, Any] = {"model": model, "dir": d, "raw": raw, "graphs": {}, "reports": {}}
    for name, seq in (("prefill", PREFILL), ("decode", 1)):
        g = Graph.load(raw)
        optimize(g, ctx_len=CTX, batch_size=1, seq_len=seq)
        report = optimize(g, ["legalize-qnn", "cleanup"])
        out["reports"][name] = report
        g.save(d / f"{name}.onnx")
        out["graphs"][name] = g
    return out


def test_legalize_qnn_leaves_the_retained_graph_alone(gpt2: dict[str, Any]) -> None:
    # Measured: the HTP takes every op of the retained-state pinned graph (module docstring of legalize_qnn).
    for name in ("prefill", "decode"):
        assert not gpt2["reports"][name]["legalize-qnn"].modified
        names = [t.name for t in gpt2["graphs"][name].inputs]
        assert names[:2] == ["input_ids", "position_ids"]
        assert all(t.dtype == np.int64 for t in gpt2["graphs"][name].inputs[:2])


@pytest.fixture(scope="module")
def compiled(gpt2: dict[str, Any]) -> dict[str, qnn.CompileReport]:
    if not qnn.qnn_available():
        pytest.skip("onnxruntime-qnn is not installed (pip install 'qgraph[qnn]')")
    d = gpt2["dir"]
    return {name: qnn.compile_context(d / f"{name}.onnx", d / "ctx" / f"{name}.onnx") for name in ("prefill", "decode")}


@needs_qnn
@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_compile_puts_every_node_on_qnn(compiled: dict[str, qnn.CompileReport], name: str) -> None:
    report = compiled[name]
    assert report.nodes_on_cpu == []
    assert report.nodes_on_qnn > 50
    assert report.out_path.is_file()
    assert [p.name for p in report.extra_files] == [f"{name}_qnn.bin"] and report.extra_files[0].is_file()
    assert report.seconds > 0


_FRESH = """
import json, sys
import numpy as np
from qgraph.targets import qnn
d = sys.argv[1]
out = {}
for name in ("prefill", "decode"):
    s = qnn.create_session(f"{d}/{name}.onnx")
    feeds = {i.name: np.zeros([int(x) for x in i.shape], np.int64 if "int64" in i.type else np.float32) for i in s.get_inputs()}
    feeds["position_ids"] = np.arange(feeds["position_ids"].shape[1], dtype=np.int64)[None]
    feeds["input_ids"] = feeds["position_ids"] + 3
    out[name] = s.run(["logits"], feeds)[0].tolist()
print(json.dumps(out))
"""


def _first_step(session: Any) -> np.ndarray:
    feeds = {i.name: np.zeros([int(x) for x in i.shape], np.int64 if "int64" in i.type else np.float32) for i in session.get_inputs()}
    feeds["position_ids"] = np.arange(feeds["position_ids"].shape[1], dtype=np.int64)[None]
    feeds["input_ids"] = feeds["position_ids"] + 3
    return session.run(["logits"], feeds)[0]


@needs_qnn
def test_context_models_load_and_run_in_a_fresh_process(compiled: dict[str, qnn.CompileReport], gpt2: dict[str, Any]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    ctx_dir = compiled["prefill"].out_path.parent
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_FRESH), str(ctx_dir)], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("prefill", "decode"):
        got = np.asarray(fresh[name], np.float32)
        want = _first_step(_cpu(gpt2["graphs"][name]))
        assert got.shape == want.shape and np.isfinite(got).all()
        assert float(np.abs(got - want).max()) < ATOL


def _hf_logits(model: Any, prompt: list[int], forced: list[int]) -> np.ndarray:
    """Hugging Face's logits at every predicting position: after the prompt, then after each forced token."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + forced])).logits[0].numpy()
    return logits[len(prompt) - 1 :]


@needs_qnn
def test_logits_on_htp_match_hugging_face_and_cpu(compiled: dict[str, qnn.CompileReport], gpt2: dict[str, Any]) -> None:
    sessions = {name: qnn.create_session(r.out_path) for name, r in compiled.items()}
    decode = gpt2["graphs"]["decode"]
    kv = [t for t in decode.inputs if t.name.startswith("past_")]
    cache = CacheSpec([t.name for t in kv], tuple(kv[0].shape), np.dtype(np.float32))
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, 64, 7).tolist()  # 7 = 4 + 3: the second prefill chunk is padded
    forced = rng.integers(0, 64, 8).tolist()  # random, not greedy: a random tiny model's greedy output repeats one token
    hf = _hf_logits(gpt2["model"], prompt, forced)

    htp = np.stack(teacher_forced_logits(_step(sessions["prefill"]), _step(sessions["decode"]), cache, [prompt], [forced], PREFILL)[0])
    cpu_sessions = {name: _cpu(gpt2["graphs"][name]) for name in ("prefill", "decode")}
    cpu = np.stack(
        teacher_forced_logits(_step(cpu_sessions["prefill"]), _step(cpu_sessions["decode"]), cache, [prompt], [forced], PREFILL)[0]
    )

    assert htp.shape == hf.shape == (9, 64)
    vs_hf, vs_cpu = float(np.abs(htp - hf).max()), float(np.abs(htp - cpu).max())
    assert vs_hf < ATOL and vs_cpu < ATOL, f"max |HTP - HF| = {vs_hf:.2e}, max |HTP - ORT CPU| = {vs_cpu:.2e}"
    assert float(np.abs(cpu - hf).max()) < 1e-4
    # Greedy: the HTP picks Hugging Face's token at every step whose top-2 gap exceeds twice the error seen.
    top2 = np.sort(hf, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * vs_hf
    assert clear.sum() >= 7, f"too few steps with a clear winner to test greedy choice ({clear.sum()} of 9)"
    assert len(set(hf.argmax(-1).tolist())) > 3  # not one token over and over
    assert (htp.argmax(-1) == hf.argmax(-1))[clear].all(), f"HTP argmax {htp.argmax(-1).tolist()} != HF {hf.argmax(-1).tolist()}"


@needs_qnn
def test_compile_model_and_runtime_generate_like_hugging_face(gpt2: dict[str, Any], tmp_path: Path) -> None:
    # The qnn target of `qgraph compile` and the runtime, end to end, on this module's functions.
    import torch

    from qgraph.compile import compile_model
    from qgraph.runtime import Runtime

    art = compile_model(gpt2["raw"], "qnn", tmp_path / "art", prefill_seq_len=PREFILL, ctx_len=CTX)
    assert sorted(p.name for p in art.iterdir()) == ["decode.onnx", "decode_qnn.bin", "manifest.json", "prefill.onnx", "prefill_qnn.bin"]
    prompt = np.random.default_rng(7).integers(0, 64, 6).tolist()
    got = Runtime(art).generate([prompt], max_new_tokens=6).tokens[0]
    ids, gaps = list(prompt), []
    with torch.no_grad():
        for _ in range(6):
            top2 = torch.topk(gpt2["model"](input_ids=torch.tensor([ids])).logits[0, -1], 2)
            ids.append(int(top2.indices[0]))
            gaps.append(float(top2.values[0] - top2.values[1]))
    want = ids[len(prompt) :]
    # Compare up to the first near-tie (top-2 gap under 4x the fp16 error measured above).
    n = next((i for i, g in enumerate(gaps) if g < 2e-3), len(gaps))
    assert n >= 3, f"Hugging Face's greedy choice is a near-tie too early (gaps {gaps})"
    assert got[:n] == want[:n], f"HTP {got} != HF {want}"


# ------------------------------------------------------------------ placement errors


@needs_qnn
def test_rejected_node_raises_placement_error_naming_it(tmp_path: Path) -> None:
    g = Graph.parse(GATHERND_BOOL_DYNAMIC)
    g.gs.nodes[0].name = "mask_lookup"
    src = g.save(tmp_path / "m.onnx")
    out = tmp_path / "ctx" / "m.onnx"
    with pytest.raises(PlacementError, match=r"1 node would fall back to the CPU: mask_lookup \(GatherND\).*--allow-cpu-fallback") as info:
        qnn.compile_context(src, out)
    assert info.value.nodes == [("mask_lookup", "GatherND")]
    assert not out.exists() and not list(out.parent.glob("*.bin"))


@needs_qnn
def test_cpu_fallback_when_allowed(tmp_path: Path) -> None:
    text = GATHERND_BOOL_DYNAMIC.replace("=> (bool[1,4] out) {", "=> (float[1,4] out) {").replace(
        "out = GatherND(mask, idx)", "picked = GatherND(mask, idx)\n    out = Cast<to=1>(picked)"
    )
    g = Graph.parse(text)
    g.gs.nodes[0].name = "mask_lookup"
    src = g.save(tmp_path / "m.onnx")
    out = tmp_path / "m_ctx.onnx"
    report = qnn.compile_context(src, out, allow_cpu_fallback=True)
    assert report.nodes_on_cpu == [("mask_lookup", "GatherND")] and report.nodes_on_qnn == 1
    with pytest.raises(PlacementError, match="mask_lookup"):
        qnn.create_session(out)
    session = qnn.create_session(out, allow_cpu_fallback=True)
    feeds = {"mask": np.array([[1, 0, 1, 1, 0, 0, 1, 0]], bool), "idx": np.array([[[0, 1], [0, 2], [0, 3], [0, 7]]], np.int64)}
    np.testing.assert_allclose(session.run(None, feeds)[0], [[0, 1, 1, 0]], atol=1e-3)  # the HTP casts True to 1.0000001


@needs_qnn
def test_legalized_graphs_compile_whole(tmp_path: Path) -> None:
    for i, (text, feeds) in enumerate([(GATHERND_BOOL, _gathernd_feeds()), (ATTENTION_BOOL, _attention_feeds())]):
        before, after = _legalized(text)
        report = qnn.compile_context(after.save(tmp_path / f"{i}.onnx"), tmp_path / f"{i}_ctx.onnx")
        assert report.nodes_on_cpu == []
        got = qnn.create_session(report.out_path).run(None, feeds)[0]
        np.testing.assert_allclose(got, _cpu(before).run(None, feeds)[0], atol=ATOL, rtol=1e-3)  # fp16 on the HTP: -10000 +- 4


@needs_qnn
def test_a_head_merge_at_batch_equal_to_heads_is_right_on_the_htp_once_legalized(tmp_path: Path) -> None:
    """The HTP computes ``MatMul(Reshape(x[2, 2, 1, 4], [2, 1, 8]), W)`` wrongly (about the outputs' own size off);
    legalize-qnn-layout gives the merge its Transpose back, and the HTP then matches ONNX Runtime's CPU."""
    from helpers import GOLDEN_DIR

    from passes import LegalizeQnnLayout

    text = (GOLDEN_DIR / "legalize-qnn-layout" / "square_head_merge.before.onnxtxt").read_text()
    before, after = Graph.parse(text), Graph.parse(text)
    assert LegalizeQnnLayout().run(after).modified
    rng = np.random.default_rng(0)
    feeds = {"attn": rng.standard_normal((2, 2, 1, 4)).astype(np.float32), "residual": np.zeros((2, 1, 6), np.float32)}
    want = _cpu(before).run(None, feeds)[0]
    errors = []
    for name, graph in (("before", before), ("after", after)):
        report = qnn.compile_context(graph.save(tmp_path / f"{name}.onnx"), tmp_path / f"{name}_ctx.onnx")
        errors.append(float(np.abs(qnn.create_session(report.out_path).run(None, feeds)[0] - want).max()))
    assert errors[1] < ATOL, errors
    assert errors[0] > 0.3, f"the HTP computes the merged form right now ({errors}): legalize-qnn-layout may go"


@needs_qnn
def test_a_llama_with_as_many_heads_as_rows_gives_cpus_tokens_on_qnn(tmp_path: Path) -> None:
    """2 attention heads at batch size 2: every decode step's head merge is the one the HTP miscomputed (tokens
    differed from cpu's from the first decode step until legalize-qnn-layout)."""
    pytest.importorskip("torch")
    from qgraph.compile import compile_model
    from qgraph.frontend.export import export_model
    from qgraph.frontend.families import FAMILIES
    from qgraph.frontend.families.decoder import RANDOM_INIT_RANGE
    from qgraph.runtime import Runtime

    fields = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=211, max_position_embeddings=128,
                  initializer_range=RANDOM_INIT_RANGE, num_attention_heads=2, num_key_value_heads=2, head_dim=32)  # fmt: skip
    folder = FAMILIES["llama"].save_random(fields, tmp_path / "hf", seed=3)  # every greedy step's top-2 gap > 0.1 (fp16 HTP)
    raw = export_model(str(folder), tmp_path / "raw.onnx", exporter="torchscript").path
    prompts = [[5, 17, 42, 9, 100, 3], [7, 8, 9]]
    tokens = {t: Runtime(compile_model(raw, t, tmp_path / t, prefill_seq_len=4, ctx_len=32, batch_size=2)).generate(prompts, max_new_tokens=8).tokens
              for t in ("cpu", "qnn")}  # fmt: skip
    assert tokens["qnn"] == tokens["cpu"]
    assert all(len(set(row)) > 3 for row in tokens["cpu"])  # greedy output that varies


@needs_qnn
def test_dynamic_shapes_are_refused(tmp_path: Path) -> None:
    g = Graph.parse('<ir_version: 10, opset_import: ["" : 18]> g (float[N,8] x) => (float[N,8] y) { y = Relu(x) }')
    with pytest.raises(StaticShapeError, match="static shapes"):
        qnn.compile_context(g.save(tmp_path / "d.onnx"), tmp_path / "d_ctx.onnx")


def test_missing_onnxruntime_qnn_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # import now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'qgraph\[qnn\]'"):
        qnn._modules()


def test_provider_options() -> None:
    opts = qnn.provider_options()
    assert opts == {"backend_type": "htp", "soc_model": str(qnn.DEFAULT_SOC_MODEL), "enable_htp_fp16_precision": "0",
                    "offload_graph_io_quantization": "0"}  # fmt: skip
    opts = qnn.provider_options(69, fp16=True, extra={"htp_performance_mode": "burst", "vtcm_mb": 8})
    assert opts["soc_model"] == "69" and opts["enable_htp_fp16_precision"] == "1" and opts["vtcm_mb"] == "8"


# ------------------------------------------------------------------ the bundled model, qnn against cpu and HF


@needs_qnn
def test_bundled_model_gives_the_same_tokens_on_qnn_and_cpu(tmp_path: Path) -> None:
    """Three prompts of different lengths at batch size 2, one longer than the prefill length."""
    import torch

    from qgraph.compile import compile_model
    from qgraph.frontend.export import export_model
    from qgraph.frontend.hf import load_model, load_tokenizer
    from qgraph.runtime import Runtime

    tok = load_tokenizer("tiny-gpt2")
    hf = load_model("tiny-gpt2")
    raw = export_model(hf, tmp_path / "tiny.onnx", exporter="torchscript").path
    prompts = [tok(t)["input_ids"] for t in ("Hi there!!", "I like to eat", "Hello, how are you today? I am fine, thank you very much.")]
    assert max(map(len, prompts)) > 8
    tokens = {}
    for target in ("cpu", "qnn"):
        art = compile_model(raw, target, tmp_path / target, prefill_seq_len=8, ctx_len=64, batch_size=2)
        tokens[target] = Runtime(art).generate(prompts, max_new_tokens=10, eos_token_id=hf.config.eos_token_id).tokens
    assert tokens["qnn"] == tokens["cpu"]
    with torch.no_grad():
        for prompt, got in zip(prompts, tokens["cpu"]):
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(prompt) :].tolist()
            assert got == want
