"""``qgraph bench`` end to end on the bundled model, with its int8 contenders (figures are printed, never asserted).

What is checked is what the figures rest on: every fp32 contender decodes the
same greedy tokens, the report and its JSON hold every field, the kernel ceiling
runs exactly the decode graph's weight products, and the quantized rows and bound
are there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from qgraph.devtools.bench import BenchReport, run_bench, write_products_only  # noqa: E402
from qgraph.errors import QGraphError  # noqa: E402

N_LAYER = 4  # the bundled tiny-gpt2


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[BenchReport, Path]:
    work = tmp_path_factory.mktemp("bench")
    report = run_bench("tiny-gpt2", prompt_len=8, new_tokens=5, rounds=2, threads=1, workdir=work, ttft_pairs=3, quantize="int8")
    return report, work


def test_contenders_agree_and_every_figure_is_there(bench: tuple[BenchReport, Path]) -> None:
    report, _ = bench
    assert report.tokens_agree, "Hugging Face, plain ONNX Runtime and qgraph chose different greedy tokens"
    assert [r.name for r in report.results] == ["huggingface-eager", "onnxruntime-plain-export", "qgraph-cpu", "qgraph-cpu-int8",
                                                "onnxruntime-matmulnbits-int8"]  # fmt: skip
    for r in report.results:
        assert len(r.runs) == 2  # one per round
        assert r.ttft_s > 0 and r.ms_per_token > 0
        assert r.decode_tokens_per_s == pytest.approx(1000 / r.ms_per_token)
    assert report.bandwidth_gb_s > 0 and report.bound_ms_per_token > 0
    assert report.kernel_ceiling_ms_per_token > 0
    q = report.results[2]
    assert report.ratios["qgraph decode / kernel ceiling"] == pytest.approx(report.kernel_ceiling_ms_per_token / q.ms_per_token)
    assert report.ratios["kernel ceiling / bandwidth bound"] == pytest.approx(
        report.bound_ms_per_token / report.kernel_ceiling_ms_per_token
    )
    table = report.table()
    assert "kernel ceiling" in table and "qgraph-cpu" in table and "greedy tokens identical across contenders (fp32): yes" in table
    data = json.loads(json.dumps(report.to_dict()))
    assert {
        "kernel_ceiling_ms_per_token",
        "kernel_ceiling_products",
        "graph_overhead_ms_per_token",
        "bound_ms_per_token",
        "results",
        "ratios",
        "round_bandwidths_gb_s",
        "round_engine_bandwidths_gb_s",
        "in_time",
    } <= set(data)
    assert len(data["round_bandwidths_gb_s"]) == 2 and max(data["round_bandwidths_gb_s"]) == data["bandwidth_gb_s"]
    assert np.isfinite(report.graph_overhead_ms_per_token) and abs(report.graph_overhead_ms_per_token) < 1e3
    assert "alternations" in table and "(per round: " in table
    # Each round measured the bound's product in both engines; the best of them is the round's bandwidth.
    for engines, best in zip(data["round_engine_bandwidths_gb_s"], data["round_bandwidths_gb_s"]):
        assert set(engines) == {"onnxruntime", "numpy"} and max(engines.values()) == pytest.approx(best)
    t = report.in_time
    assert t["alternations"] == 120 and t["engine factor"] >= 1.0 and t["ttft alternations"] == 3
    assert 0 < t["qgraph TTFT / onnxruntime TTFT"] < 1e3 and "TTFT paired in time (3 alternations" in table
    # The paired bound is the bound's product time scaled to the model's weight bytes and the better engine.
    assert t["bound ms per token"] > 0 and t["qgraph decode step ms"] > 0
    for key in ("qgraph decode / bandwidth bound", "kernel ceiling / bandwidth bound"):
        assert 0 < t[key] < 1e3
    assert "paired in time" in table
    assert set(report.paired_ratios) <= set(report.ratios) and len(report.paired_ratios) == 9
    assert all(v > 0 for v in report.paired_ratios.values())


def test_quantized_rows_ratios_and_bound(bench: tuple[BenchReport, Path]) -> None:
    report, _ = bench
    assert report.quantize == "int8" and report.quant_block_size == 32
    # Every weight product at 8 bits with an fp32 scale per 32 weights (9/32 of its fp32 bytes), the rest as before.
    products = report.kernel_ceiling_bytes
    assert report.quantized_weight_bytes == pytest.approx(report.weight_bytes - products + products * 9 / 32, rel=1e-6)
    assert report.quantized_bound_ms_per_token == pytest.approx(
        report.bound_ms_per_token * report.quantized_weight_bytes / report.weight_bytes
    )
    by = {r.name: r for r in report.results}
    q, fp32, nbits = by["qgraph-cpu-int8"], by["qgraph-cpu"], by["onnxruntime-matmulnbits-int8"]
    assert report.ratios["qgraph int8 decode / qgraph decode"] == pytest.approx(fp32.ms_per_token / q.ms_per_token)
    assert report.ratios["qgraph int8 TTFT / qgraph TTFT"] == pytest.approx(q.ttft_s / fp32.ttft_s)
    assert report.ratios["qgraph int8 decode / onnxruntime matmulnbits int8 decode"] == pytest.approx(nbits.ms_per_token / q.ms_per_token)
    assert report.ratios["qgraph int8 decode / int8 bandwidth bound"] == pytest.approx(report.quantized_bound_ms_per_token / q.ms_per_token)
    # Both quantized rows decoded every token; how many equal fp32's is reported, not judged.
    assert set(report.quantized_tokens_agree) == {"qgraph-cpu-int8", "onnxruntime-matmulnbits-int8"}
    assert all(0 <= k <= report.new_tokens for k in report.quantized_tokens_agree.values())
    assert report.notes == ["onnxruntime-genai: its builder does not take gpt2 models"]
    targets = {t["ratio"]: t for t in report.targets()}
    assert targets["qgraph int8 decode / qgraph decode"]["at_least"] == 1.8
    assert targets["qgraph int8 TTFT / qgraph TTFT"]["at_most"] == 1.0
    assert not any("int4" in k or "genai" in k for k in targets)  # only what this run measured is judged
    table = report.table()
    assert (
        "int8 (block 32, vocabulary int8): every weight product quantized" in table and "not run: onnxruntime-genai: its builder" in table
    )
    assert "int8 greedy tokens equal to fp32's before the first difference (of 5)" in table


def test_targets_are_judged_from_the_reported_figures(bench: tuple[BenchReport, Path]) -> None:
    from qgraph.devtools.bench import Result

    # Made-up figures, to check the verdicts and the time per token each decode target needs.
    results = [Result("huggingface-eager", 0.09, 1000 / 34.0, 34.0), Result("onnxruntime-plain-export", 0.065, 1000 / 26.0, 26.0),
               Result("qgraph-cpu", 0.052, 1000 / 24.0, 24.0)]  # fmt: skip
    ratios = {"qgraph decode / huggingface decode": 34 / 24, "qgraph decode / onnxruntime decode": 26 / 24,
              "qgraph decode / bandwidth bound": 20 / 24, "qgraph TTFT / onnxruntime TTFT": 0.8}  # fmt: skip
    in_time = {"qgraph decode / bandwidth bound": 0.91, "kernel ceiling / bandwidth bound": 0.95, "bound ms per token": 21.0,
               "qgraph decode step ms": 23.0, "engine factor": 1.0, "alternations": 120.0}  # fmt: skip
    r = BenchReport("m", 32, 64, 2, 494_000_000, 24.7, 20.0, results, ratios, True,
                    paired_ratios={"qgraph decode / bandwidth bound": 0.88}, in_time=in_time)  # fmt: skip
    t = {x["ratio"]: x for x in r.targets()}
    hf, ort_, bound, ttft = (t[k] for k in ratios)
    assert hf["at_least"] == 2.0 and not hf["met"] and hf["needs_ms_per_token"] == pytest.approx(17.0)
    assert hf["needs_x_bound"] == pytest.approx(20 / 17)  # faster than the bound: out of reach by reading weights once
    assert ort_["met"] and ort_["needs_ms_per_token"] == pytest.approx(26.0)
    assert not bound["met"] and bound["met_per_round"] is False and bound["met_in_time"] is True
    assert bound["needs_ms_per_token"] == pytest.approx(20 / 0.9) and bound["in_time"] == 0.91 and "needs_x_bound" not in bound
    assert ttft["at_most"] == 1.0 and ttft["met"] and ttft["per_round"] is None and "needs_ms_per_token" not in ttft
    table = r.table()
    assert "decode vs Hugging Face eager, at least 2x: 1.42 missed; needs 17.00 ms/token, 1.18x the bound's speed" in table
    assert "decode vs the bandwidth bound, at least 0.9x: 0.83 (per round 0.88, in time 0.91) missed; needs 22.22 ms/token\n" in table
    assert "TTFT vs ONNX Runtime on the plain export, at most 1x: 0.80 met" in table
    # The bench's own report carries all four, in its JSON too.
    report, _ = bench
    data = json.loads(json.dumps(report.to_dict()))
    assert [x["ratio"] for x in data["targets"]][:4] == list(ratios)
    assert all(isinstance(x["met"], bool) and x["in_time"] is not None for x in data["targets"][2:4])


def test_quantized_and_genai_targets_are_judged_against_their_own_figures() -> None:
    from qgraph.devtools.bench import Result

    # Made-up figures of a Llama run with --quantize int4: the quantized bound is 5 ms/token, the fp32 one 20.
    ms = {"huggingface-eager": 32.0, "onnxruntime-plain-export": 16.0, "qgraph-cpu": 15.0, "onnxruntime-genai": 15.0,
          "qgraph-cpu-int4": 6.0, "onnxruntime-matmulnbits-int4": 9.0, "onnxruntime-genai-int4": 4.0}  # fmt: skip
    results = [Result(n, 0.05, 1000 / v, v) for n, v in ms.items()]
    ratios = {"qgraph decode / onnxruntime-genai decode": 1.0, "qgraph TTFT / onnxruntime-genai TTFT": 1.0,
              "qgraph int4 decode / qgraph decode": 2.5, "qgraph int4 decode / onnxruntime matmulnbits int4 decode": 1.5,
              "qgraph int4 decode / onnxruntime-genai int4 decode": 4 / 6, "qgraph int4 TTFT / qgraph TTFT": 1.0}  # fmt: skip
    r = BenchReport("m", 32, 64, 2, 400_000_000, 20.0, 20.0, results, ratios, True, quantize="int4", quant_block_size=32,
                    quantized_weight_bytes=100_000_000, quantized_bound_ms_per_token=5.0)  # fmt: skip
    t = {x["ratio"]: x for x in r.targets()}
    assert list(t) == list(ratios)  # in TARGETS' order; the int8 ones were not measured
    assert t["qgraph decode / onnxruntime-genai decode"]["met"] and t["qgraph int4 decode / qgraph decode"]["met"]
    genai4 = t["qgraph int4 decode / onnxruntime-genai int4 decode"]
    assert not genai4["met"] and genai4["needs_ms_per_token"] == pytest.approx(4.0)
    assert genai4["needs_x_bound"] == pytest.approx(5.0 / 4.0)  # against the bytes a quantized step reads
    assert t["qgraph decode / onnxruntime-genai decode"]["needs_x_bound"] == pytest.approx(20.0 / 15.0)
    table = r.table()
    assert "int4 (block 32, vocabulary int4): every weight product quantized, 100.0 MB read per step -> bound 5.00 ms/token" in table
    # Each row's "x bound" against its own bound: qgraph int4 at 5 / 6, qgraph fp32 at 20 / 15.
    rows = {line.split()[0]: line.split()[-1] for line in table.splitlines() if line.split() and line.split()[0] in ms}
    assert rows["qgraph-cpu-int4"] == "0.83" and rows["qgraph-cpu"] == "1.33"
    assert "int4 decode vs onnxruntime-genai int4, at least 1x: 0.67 missed; needs 4.00 ms/token, 1.25x the bound's speed" in table
    assert "decode vs onnxruntime-genai fp32, at least 1x: 1.00 met" in table  # exactly at the threshold


def test_a_ratio_that_rounds_to_its_threshold_shows_the_digit_that_decides() -> None:
    """0.9993 against at least 1x: "1.00 missed" would contradict itself, so the table prints 0.999."""
    from qgraph.devtools.bench import Result

    results = [Result(n, 0.05, 1000 / v, v) for n, v in {"qgraph-cpu": 15.01, "onnxruntime-genai": 15.0}.items()]
    for ratio, shown in [(15.0 / 15.01, "0.999 missed"), (1.004, "1.004 met"), (0.99, "0.99 missed"), (1.0, "1.00 met")]:
        r = BenchReport("m", 32, 64, 2, 400_000_000, 20.0, 20.0, results, {"qgraph decode / onnxruntime-genai decode": ratio}, True)
        assert f"decode vs onnxruntime-genai fp32, at least 1x: {shown}" in r.table(), (ratio, r.table().splitlines()[-1])


def test_kernel_ceiling_runs_the_decode_graphs_products(bench: tuple[BenchReport, Path]) -> None:
    report, work = bench
    # Four per layer (qkv, attention output, MLP in and out) and the vocabulary projection.
    assert report.kernel_ceiling_products == 4 * N_LAYER + 1
    # Every weight byte but the norms, biases and the position table, read once.
    assert 0.85 * report.weight_bytes < report.kernel_ceiling_bytes <= report.weight_bytes
    assert not (work / "products-only.onnx").exists()  # written for the session, then removed


def test_products_only_keeps_shapes_and_layout(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 12), dtype=np.float32)
    w2 = rng.standard_normal((5, 12), dtype=np.float32)  # Gemm with transB: [N, K]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1),
        helper.make_node("Transpose", ["a"], ["a_t"]),
        helper.make_node("MatMul", ["y", "a_t"], ["z"]),  # an activation, not a weight: not a weight product
        helper.make_node("MatMul", ["z", "w3"], ["out"]),  # a weight the runtime binds (a 2-D graph input)
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]), helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 5]),
              helper.make_tensor_value_info("w3", TensorProto.FLOAT, [3, 7])]  # fmt: skip
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 7])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])  # fmt: skip
    src = tmp_path / "decode.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    out = tmp_path / "products.onnx"
    feeds, count, nbytes = write_products_only(src, out)
    assert count == 3 and nbytes == w1.nbytes + w2.nbytes + 3 * 7 * 4
    m = onnx.load(str(out))
    assert [(n.op_type, [a.i for a in n.attribute]) for n in m.graph.node] == [("MatMul", []), ("Gemm", [1]), ("MatMul", [])]
    assert [list(t.dims) for t in m.graph.initializer] == [[8, 12], [5, 12]]
    assert feeds["w2"].shape == (3, 7)  # the bound weight is fed, like the runtime binds it
    ys = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert [y.shape for y in ys] == [(1, 12), (1, 5), (1, 7)]
    empty = tmp_path / "empty.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "e",
              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])), empty)  # fmt: skip
    with pytest.raises(QGraphError, match="no MatMul/Gemm"):
        write_products_only(empty, tmp_path / "p2.onnx")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qgraph.cli", "bench", *args], capture_output=True, text=True, env=env, timeout=600)


def test_cli_json_output(bench: tuple[BenchReport, Path], tmp_path: Path) -> None:
    _, work = bench  # reuses the fixture's export
    out = tmp_path / "b.json"
    res = _cli("--model", "tiny-gpt2", "--prompt-len", "8", "--new-tokens", "3", "--rounds", "1", "--threads", "1",
               "--workdir", str(work), "--output", str(out), "--json", "--quantize", "int8")  # fmt: skip
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["tokens_agree"] and printed["new_tokens"] == 3 and printed["kernel_ceiling_products"] == 4 * N_LAYER + 1
    assert printed["quantize"] == "int8" and "onnxruntime-matmulnbits-int8" in [r["name"] for r in printed["results"]]


def test_cli_refuses_bad_arguments(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    res = _cli("--model", "tiny-gpt2", "--new-tokens", "1", "--output", str(out))
    assert res.returncode == 2 and "--new-tokens must be at least 2" in res.stderr and "Traceback" not in res.stderr
    res = _cli("--model", "tiny-gpt2", "--rounds", "0", "--output", str(out))
    assert res.returncode == 2 and "--rounds must be at least 1" in res.stderr
    res = _cli("--model", "tiny-gpt2", "--quantize", "int4", "--quant-block-size", "24", "--output", str(out))
    assert res.returncode == 2 and "--quant-block-size" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = _cli("--model", "tiny-gpt2", "--quantize", "w8a16", "--output", str(out))  # the NPU's mode: not a bench row
    assert res.returncode == 2 and "invalid choice: 'w8a16'" in res.stderr
    assert not out.exists()


def test_ab_decode_tool_compares_two_artifacts_in_both_orders(bench: tuple[BenchReport, Path], tmp_path: Path) -> None:
    _, work = bench
    tool, art = Path(__file__).parents[1] / "tools" / "ab_decode.py", str(work / "cpu")
    cmd = [sys.executable, str(tool), art, art, "--steps", "20", "--prefills", "4", "--threads", "1", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["max_logits_diff"] == 0.0  # one artifact against itself: the same logits
    for order in ("a_then_b", "b_then_a"):
        assert r[order]["decode_first_ms"] > 0 and r[order]["decode_second_ms"] > 0
    # The effect and the bias are the half difference and the half sum of the two orders' medians.
    ab, ba = r["a_then_b"]["decode_diff_ms"], r["b_then_a"]["decode_diff_ms"]
    assert r["decode_effect_ms"] == pytest.approx((ab - ba) / 2) and r["decode_second_opened_bias_ms"] == pytest.approx((ab + ba) / 2)
    assert np.isfinite(r["prefill_effect_ms"])
    bad = subprocess.run([sys.executable, str(tool), art, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a compiled artifact" in bad.stderr
