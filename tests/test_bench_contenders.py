"""The bench's other contenders on tiny models: onnxruntime-genai (its builder and its generation loop), ONNX Runtime's
MatMulNBits path on the plain export, and the bytes behind the bounds (figures are printed by the bench, never
asserted here: what is checked is what they rest on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import random_gpt2  # noqa: E402

from qgraph.devtools.bench.bound import WeightProduct, quantized_bytes, quantized_step_bytes, weight_products  # noqa: E402
from qgraph.devtools.bench.contenders import leading_agreement, streamed_weight_bytes, time_hf, time_ort_raw  # noqa: E402
from qgraph.devtools.bench.ort_quant import constant_weight_matmuls, quantize_plain_export  # noqa: E402
from qgraph.frontend.families import llama, spec_of  # noqa: E402
from qgraph.frontend.families.decoder import RANDOM_INIT_RANGE  # noqa: E402

#: A tiny Llama: grouped KV heads (4 / 2), untied, a vocabulary that is not a power of two.
TINY_LLAMA: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                  vocab_size=301, max_position_embeddings=128, tie_word_embeddings=False,
                                  initializer_range=RANDOM_INIT_RANGE)  # fmt: skip
PROMPT = [5, 77, 140, 3, 250, 31, 9, 200]


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A tiny random GPT-2 (varied greedy tokens) and its plain dynamo export: Gemm layers and a tied, transposed
    vocabulary projection."""
    from qgraph.frontend.export import export_model

    work = tmp_path_factory.mktemp("gpt2")
    _, model = random_gpt2(initializer_range=RANDOM_INIT_RANGE)
    export_model(model, work / "raw.onnx", exporter="dynamo")
    return model, work / "raw.onnx"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder with a word-level tokenizer (what onnxruntime-genai's builder needs)."""
    from qgraph.devtools.bench.genai import write_word_tokenizer

    folder = llama.save_random(TINY_LLAMA, tmp_path_factory.mktemp("llama") / "hf")
    write_word_tokenizer(folder, TINY_LLAMA["vocab_size"])
    return folder


def _prefill_logits(path: Path, spec: Any) -> np.ndarray:
    sess = _session(path)
    past = {i.name: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32) for i in sess.get_inputs() if i.name.startswith("past")}
    n = len(PROMPT)
    feeds = {"input_ids": np.array([PROMPT]), "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n)[None], **past}
    return sess.run(["logits"], feeds)[0]


def test_matmulnbits_anchor_quantizes_every_linear_layer(gpt2_export: tuple[Any, Path], tmp_path: Path) -> None:
    model, raw = gpt2_export
    layers, spec = model.config.n_layer, spec_of(model.config)
    fp32 = _prefill_logits(raw, spec)
    error = {}
    for precision in ("int4", "int8"):
        out = tmp_path / f"{precision}.onnx"
        stats = quantize_plain_export(raw, out, precision, block_size=16)
        # Four Gemm layers per block, and the tied projection read through Transpose(wte): all of them quantized.
        assert stats == {"gemm": 4 * layers, "transposed_weight": 1, "matmulnbits": 4 * layers + 1}
        q = onnx.load(str(out), load_external_data=False)
        nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
        assert not [n for n in q.graph.node if n.op_type == "Gemm"] and len(nbits) == 4 * layers + 1
        attrs = {a.name: helper.get_attribute_value(a) for a in nbits[0].attribute}
        assert attrs["bits"] == int(precision[3:]) and attrs["block_size"] == 16 and attrs["accuracy_level"] == 4
        logits = _prefill_logits(out, spec)
        error[precision] = float(np.linalg.norm(logits - fp32) / np.linalg.norm(fp32))
        # The quantized plain export decodes through the bench's loop.
        _, _, toks = time_ort_raw(_session(out), spec, PROMPT, 10)
        assert len(toks) == 10
    # Weight-only rounding, not a broken graph: int8 close to fp32 (the same argmax at every prompt position), int4
    # further off (random weights with initializer_range 0.3 are hard on 4 bits).
    assert error["int8"] < 0.05 and error["int8"] < error["int4"] < 0.5, error


def test_gemm_becomes_matmul_only_where_it_means_the_same() -> None:
    rng = np.random.default_rng(0)
    w = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in
         [("w_t", (5, 4)), ("w", (4, 5)), ("b", (5,)), ("w_a", (4, 5)), ("e", (6, 4))]}  # fmt: skip
    nodes = [
        helper.make_node("Gemm", ["x", "w_t", "b"], ["y1"], name="transposed", transB=1),  # converted, bias as an Add
        helper.make_node("Gemm", ["x", "w"], ["y2"], name="plain"),  # converted, no bias
        helper.make_node("Gemm", ["x", "w_a"], ["y3"], name="scaled", alpha=0.5),  # kept: alpha is not 1
        helper.make_node("Gemm", ["x", "dyn"], ["y4"], name="fed"),  # kept: its weight is a graph input
        helper.make_node("Transpose", ["e"], ["e_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "e_t"], ["y5"], name="tied"),  # reads e transposed as its own initializer
    ]
    f = onnx.TensorProto.FLOAT
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [3, 4]), helper.make_tensor_value_info("dyn", f, [4, 5])],
                              [helper.make_tensor_value_info(f"y{i}", f, [3, 6 if i == 5 else 5]) for i in range(1, 6)],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal((3, 4), dtype=np.float32), "dyn": rng.standard_normal((4, 5), dtype=np.float32)}
    before = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    assert constant_weight_matmuls(model) == {"gemm": 2, "transposed_weight": 1}
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "MatMul", "Gemm", "Gemm", "Transpose", "MatMul"]
    assert model.graph.node[-1].input[1] == "e/t"
    after = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("bits", "k", "n", "block"), [(4, 64, 10, 32), (8, 48, 7, 32), (4, 40, 3, 16)])
def test_quantized_bytes_are_what_matmulnbits_stores(tmp_path: Path, bits: int, k: int, n: int, block: int) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    f = onnx.TensorProto.FLOAT
    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info("x", f, [1, k])],
                              [helper.make_tensor_value_info("y", f, [1, n])], [numpy_helper.from_array(w, "w")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    products = weight_products(model)
    assert products == [WeightProduct(k, n, trans_b=False, fed=False, vocab=True)]  # its output is the graph's: the logits
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True, accuracy_level=4)
    q.process()
    stored = sum(numpy_helper.to_array(t).nbytes for t in q.model.model.graph.initializer)
    assert quantized_bytes(products, bits, block) == stored  # the packed weight and its fp32 scales, no zero points
    # Read by another op, the same product is a linear layer, not the vocabulary projection (its bits are --quantize's).
    hidden = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
                               [helper.make_tensor_value_info("x", f, [1, k])], [helper.make_tensor_value_info("y", f, [1, n])],
                               [numpy_helper.from_array(w, "w")])  # fmt: skip
    assert weight_products(helper.make_model(hidden, opset_imports=[helper.make_opsetid("", 17)]))[0].vocab is False


def test_a_rescored_vocabulary_is_priced_at_its_candidates_blocks() -> None:
    """The quantized step's bytes: gpt2-small's vocabulary under int4-rescore reads int4 blocks of 128 (20.5 MB, against
    24.1 MB in blocks of 32), the layers int4 blocks of 32, the rest (here 1 MB of norms) as it was."""
    layers, vocab = [WeightProduct(768, 2304, False, False)], WeightProduct(768, 50257, False, True, vocab=True)
    rest = 1_000_000
    fp32 = rest + (768 * 2304 + 768 * 50257) * 4
    layer_bytes = 2304 * 24 * (16 + 4)
    rescored = quantized_step_bytes([*layers, vocab], fp32, 4, 32, 4, rescored=True)
    assert rescored == rest + layer_bytes + 50257 * 6 * (64 + 4)  # 768 / 128 = 6 blocks of 64 bytes and a scale
    assert quantized_step_bytes([*layers, vocab], fp32, 4, 32, 4, rescored=False) == rest + layer_bytes + 50257 * 24 * (16 + 4)
    assert quantized_step_bytes([*layers, vocab], fp32, 4, 32, 8, rescored=False) == rest + layer_bytes + 50257 * 24 * (32 + 4)
    assert round((rescored - rest - layer_bytes) / 1e6, 1) == 20.5


def test_streamed_bytes_leave_out_an_untied_input_embedding(tiny_llama: Path) -> None:
    from qgraph.frontend.hf import load_model

    untied = load_model(str(tiny_llama))
    every = sum(p.numel() * 4 for p in untied.parameters())
    embedding = TINY_LLAMA["vocab_size"] * TINY_LLAMA["hidden_size"] * 4
    assert streamed_weight_bytes(untied) == every - embedding  # a step reads one row of it
    _, gpt2 = random_gpt2()
    # GPT-2's embedding is its projection, read whole; its position table is not (one row).
    assert streamed_weight_bytes(gpt2) == sum(p.numel() * 4 for p in gpt2.parameters()) - gpt2.transformer.wpe.weight.nbytes


def test_leading_agreement() -> None:
    assert leading_agreement([1, 2, 3], [1, 2, 3]) == 3
    assert leading_agreement([1, 5, 3], [1, 2, 3]) == 1
    assert leading_agreement([9], [1, 2]) == 0


def test_genai_contender_is_refused_in_one_line_where_it_cannot_run(tmp_path: Path) -> None:
    from qgraph.devtools.bench.run import genai_contenders

    def say(_: str) -> None:
        pass

    rows, notes = genai_contenders("tiny-gpt2", "gpt2", tmp_path, ["fp32"], 1, 32, PROMPT, 4, say)
    assert rows == [] and notes == ["onnxruntime-genai: its builder does not take gpt2 models"]
    rows, notes = genai_contenders(str(tmp_path), "llama", tmp_path, ["fp32"], 1, 32, PROMPT, 4, say)
    assert rows == [] and len(notes) == 1 and ("tokenizer.json" in notes[0] or "not installed" in notes[0])


def test_a_model_genai_refuses_is_a_note_and_the_bench_goes_on(tmp_path: Path) -> None:
    """genai's generator refuses an EOS id outside the vocabulary (a config without one: its builder writes
    vocab_size); its builder refuses a Phi-3 whose context differs from original_max_position_embeddings (it takes
    that for longrope). Each is one note naming it, and the other precision still runs."""
    pytest.importorskip("onnxruntime_genai")
    from qgraph.devtools.bench.genai import write_word_tokenizer
    from qgraph.devtools.bench.run import genai_contenders
    from qgraph.frontend.families import FAMILIES

    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                 vocab_size=256, max_position_embeddings=64)  # fmt: skip
    qwen = FAMILIES["qwen2"].save_random(shape, tmp_path / "qwen2")  # Qwen2Config's eos_token_id is None
    write_word_tokenizer(qwen, 256)
    rows, notes = genai_contenders(str(qwen), "qwen2", tmp_path / "w1", ["fp32"], 1, 32, PROMPT, 4, lambda _: None)
    assert rows == [] and len(notes) == 1 and notes[0].startswith("onnxruntime-genai: ") and "eos_token_id" in notes[0], notes
    phi3 = FAMILIES["phi3"].save_random({**shape, "pad_token_id": 0}, tmp_path / "phi3")  # 64 positions, originally 4096
    write_word_tokenizer(phi3, 256)
    rows, notes = genai_contenders(str(phi3), "phi3", tmp_path / "w2", ["fp32"], 1, 32, PROMPT, 4, lambda _: None)
    assert rows == [] and len(notes) == 1 and "builder failed" in notes[0] and "\n" not in notes[0], notes
    # One precision refused, another run: the contender that runs keeps its own name.
    llama = FAMILIES["llama"].save_random(shape, tmp_path / "llama")
    write_word_tokenizer(llama, 256)
    rows, notes = genai_contenders(str(llama), "llama", tmp_path / "w3", ["fp32", "int5"], 1, 32, PROMPT, 4, lambda _: None)
    assert [name for name, _ in rows] == ["onnxruntime-genai"] and len(notes) == 1 and "int5" in notes[0], notes


def test_genai_builds_and_decodes_hugging_face_greedy_tokens(tiny_llama: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime_genai")
    from qgraph.devtools.bench.genai import GenaiRunner, build
    from qgraph.frontend.hf import load_model

    hf = load_model(str(tiny_llama))
    _, _, ref = time_hf(hf, PROMPT, 16)
    assert len(set(ref)) > 5  # varied: a cache or position bug would show
    fp32 = GenaiRunner(build(tiny_llama, tmp_path / "fp32", "fp32"), threads=1)
    ttft, decode, toks = fp32.run(PROMPT, 16)
    assert toks == ref and ttft > 0 and decode > 0
    assert fp32.run(PROMPT, 16)[2] == ref  # a second generation starts afresh
    built = build(tiny_llama, tmp_path / "int4", "int4", block_size=32)
    ops = {n.op_type for n in onnx.load(str(built / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops
    assert len(GenaiRunner(built, threads=1).run(PROMPT, 16)[2]) == 16  # never stops early


def test_bench_on_a_llama_runs_every_contender_to_the_same_tokens(tiny_llama: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime_genai")
    from qgraph.devtools.bench import run_bench
    from qgraph.frontend.hf import load_model

    report = run_bench(str(tiny_llama), prompt_len=8, new_tokens=6, rounds=1, threads=1, workdir=tmp_path, ttft_pairs=2)
    names = [r.name for r in report.results]
    assert names == ["huggingface-eager", "onnxruntime-plain-export", "qgraph-cpu", "onnxruntime-genai"] and not report.notes
    assert report.tokens_agree  # Hugging Face, the plain export, qgraph and genai: the same greedy tokens
    assert report.weight_bytes == streamed_weight_bytes(load_model(str(tiny_llama)))
    by = {r.name: r for r in report.results}
    q, g = by["qgraph-cpu"], by["onnxruntime-genai"]
    assert report.ratios["qgraph decode / onnxruntime-genai decode"] == pytest.approx(g.ms_per_token / q.ms_per_token)
    assert report.ratios["qgraph TTFT / onnxruntime-genai TTFT"] == pytest.approx(q.ttft_s / g.ttft_s)
    targets = {t["ratio"]: t for t in report.targets()}
    assert targets["qgraph decode / onnxruntime-genai decode"]["at_least"] == 1.0
    assert targets["qgraph decode / onnxruntime-genai decode"]["needs_ms_per_token"] == pytest.approx(g.ms_per_token)
    assert "onnxruntime-genai" in report.table()


def test_int4_bench_runs_the_vocabulary_in_both_modes(tiny_llama: Path, tmp_path: Path) -> None:
    """--quantize int4 runs qgraph's default artifact (the vocabulary's candidates rescored in int8) and the plain int4
    one beside genai int4."""
    pytest.importorskip("onnxruntime_genai")
    from qgraph.devtools.bench import run_bench

    report = run_bench(str(tiny_llama), prompt_len=8, new_tokens=4, rounds=1, threads=1, workdir=tmp_path, ttft_pairs=1, genai_pairs=2,
                       quantize="int4")  # fmt: skip
    names = [r.name for r in report.results]
    assert names[3:] == ["onnxruntime-genai", "qgraph-cpu-int4", "qgraph-cpu-int4-vocab-int4", "onnxruntime-matmulnbits-int4",
                         "onnxruntime-genai-int4"]  # fmt: skip
    by = {r.name: r for r in report.results}
    alt, genai4 = by["qgraph-cpu-int4-vocab-int4"], by["onnxruntime-genai-int4"]
    assert report.ratios["qgraph int4 vocab int4 decode / onnxruntime-genai int4 decode"] == pytest.approx(
        genai4.ms_per_token / alt.ms_per_token
    )
    assert report.quant_vocab == "int4-rescore"
    assert (
        "(the -vocab-int4 row: the vocabulary plainly int4, its blocks all of the asked size (a few more bytes), without the rescoring)"
        in report.table()
    )
    assert set(report.quantized_tokens_agree) == {"qgraph-cpu-int4", "qgraph-cpu-int4-vocab-int4", "onnxruntime-matmulnbits-int4",
                                                  "onnxruntime-genai-int4"}  # fmt: skip
    # Both precisions against genai, paired in time: beside the rounds' figure in the targets, and a line of the table.
    keys = ["qgraph decode / onnxruntime-genai decode", "qgraph int4 decode / onnxruntime-genai int4 decode"]
    assert report.in_time["genai alternations"] == 2 and all(report.in_time[k] > 0 for k in keys)
    targets = {t["ratio"]: t for t in report.targets()}
    assert all(targets[k]["in_time"] == report.in_time[k] for k in keys)
    assert "decode against onnxruntime-genai paired in time (2 alternations of whole generations, 0.5 s apart): " in report.table()


def test_genai_in_time_is_genais_decode_over_qgraphs_per_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole generations taken in turn: the median over turns of genai's decode seconds over qgraph's, per precision
    where both ran (here int4 has no genai row)."""
    from qgraph.devtools.bench import run

    monkeypatch.setattr(run, "GENERATION_PAUSE_S", 0.0)
    seconds = {"qgraph-cpu": iter([2.0, 2.0, 4.0]), "onnxruntime-genai": iter([3.0, 2.0, 6.0]), "qgraph-cpu-int4": iter([1.0] * 3)}
    contenders = {name: (lambda it=it: (0.1, next(it), [])) for name, it in seconds.items()}
    said: list[str] = []
    got = run.genai_in_time(contenders, "int4", 3, said.append)
    assert got == {"qgraph decode / onnxruntime-genai decode": 1.5, "genai alternations": 3.0}
    assert said == ["alternating 3 whole generations of qgraph and onnxruntime-genai (fp32)"]
    assert run.genai_in_time(contenders, None, 0, said.append) == {}
