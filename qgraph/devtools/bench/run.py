"""The driver, :func:`run_bench`: the contenders measured in rounds against the bound and the kernel ceiling.

Always: Hugging Face eager, ONNX Runtime on the plain export and qgraph's cpu artifact; onnxruntime-genai for the
families its builder takes (:mod:`.genai`). With ``quantize`` (int4, int8) also qgraph's quantized artifact, ONNX
Runtime's MatMulNBits path on the plain export (:mod:`.ort_quant`) and onnxruntime-genai at that precision, against
the bound for the bytes a quantized step reads."""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from passes.quantize_weights import VOCAB_MODES
from qgraph.devtools.bench.bound import (
    bandwidth_by_engine,
    bound_product,
    quantized_step_bytes,
    weight_products,
    write_products_only,
)
from qgraph.devtools.bench.contenders import leading_agreement, model_folder, streamed_weight_bytes, time_hf, time_ort_raw
from qgraph.devtools.bench.genai import GENAI_FAMILIES, GenaiRunner, genai_missing
from qgraph.devtools.bench.ort_quant import BITS, quantize_plain_export
from qgraph.devtools.bench.report import BenchReport, Result, ratio_pairs
from qgraph.devtools.bench.timing import (
    GENAI_PAIRS,
    GENERATION_PAUSE_S,
    PAIRS,
    TTFT_PAIRS,
    TTFT_PAUSE_S,
    in_turn,
    paired_in_time,
)
from qgraph.errors import QGraphError
from qgraph.frontend.families import spec_of
from qgraph.pipeline.options import DEFAULT_CTX_LEN, DEFAULT_QUANT_BLOCK_SIZE, check_quant_details, check_quantize, default_quant_vocab

log = logging.getLogger(__name__)


def run_bench(
    model: str = "random:gpt2",
    *,
    prompt_len: int = 32,
    new_tokens: int = 64,
    rounds: int = 3,
    threads: int = 2,
    workdir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    ttft_pairs: int = TTFT_PAIRS,
    genai_pairs: int = GENAI_PAIRS,
    quantize: str | None = None,
    quant_block_size: int | None = None,
    quant_vocab: str | None = None,
) -> BenchReport:
    """Measure every contender (see the module docstring); returns the report. ``quantize``: int4 or int8 adds the
    quantized contenders (``quant_block_size`` weights per block; qgraph's vocabulary in ``quant_vocab``, default the mode's) to the
    fp32 ones."""
    import torch

    check_quant_details(quantize, quant_block_size, quant_vocab)
    block_size = DEFAULT_QUANT_BLOCK_SIZE if quant_block_size is None else quant_block_size
    vocab = default_quant_vocab(quantize) if quant_vocab is None else quant_vocab
    check_quantize(quantize, block_size, "cpu", vocab)  # before any work: the rule of every command
    say = progress or (lambda m: log.info("%s", m))
    torch.set_num_threads(threads)
    own_tmp = workdir is None
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="qgraph-bench-"))
    try:
        return _run_bench(model, tmp, prompt_len, new_tokens, rounds, threads, say, ttft_pairs, genai_pairs, quantize, block_size, vocab)
    finally:
        if own_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


Timed = Callable[[], tuple[float, float, list[int]]]


def genai_contenders(folder: str, family: str, tmp: Path, precisions: list[str], threads: int, block_size: int,
                      prompt: list[int], new_tokens: int, say: Callable[[str], None]) -> tuple[list[tuple[str, Timed]], list[str]]:  # fmt: skip
    """onnxruntime-genai at each of ``precisions`` (fp32, int4, int8), each as a contender or a note saying why it is
    not run: a model its builder or its generator refuses leaves the rest of the bench running."""
    from qgraph.devtools.bench.genai import build

    why = genai_missing()
    if family not in GENAI_FAMILIES:
        why = f"onnxruntime-genai: its builder does not take {family} models"
    elif why is None and not Path(folder).is_dir():
        why = f"onnxruntime-genai: its builder needs a local model folder, not {folder!r}"
    elif why is None and not (Path(folder) / "tokenizer.json").is_file():
        why = f"onnxruntime-genai: its builder needs a tokenizer.json in {folder}"
    if why is not None:
        return [], [why]
    out, notes = [], []
    for precision in precisions:
        say(f"building onnxruntime-genai's {precision} model")
        built = tmp / ("genai-fp32" if precision == "fp32" else f"genai-{precision}-block{block_size}")  # reused when there
        name = "onnxruntime-genai" + ("" if precision == "fp32" else f"-{precision}")
        try:
            runner = GenaiRunner(build(folder, built, precision, block_size=block_size), threads)
            runner.run(prompt[:2], 2)  # its generator checks the config (an EOS id outside the vocabulary, ...) here
        except Exception as e:  # the builder's and the generator's own errors: one line, the bench goes on
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            notes.append(first if first.startswith("onnxruntime-genai") else f"{name}: {first}")
            continue
        out.append((name, lambda r=runner: r.run(prompt, new_tokens)))
    return out, notes


def _run_bench(model: str, tmp: Path, prompt_len: int, new_tokens: int, rounds: int, threads: int,
               say: Callable[[str], None], ttft_pairs: int, genai_pairs: int, quantize: str | None, block_size: int,
               vocab: str) -> BenchReport:  # fmt: skip
    import onnx
    import onnxruntime as ort

    from qgraph.compile import compile_model
    from qgraph.frontend.export import export_model
    from qgraph.frontend.hf import load_model
    from qgraph.ir.files import remove_model_files
    from qgraph.runtime import Runtime

    if new_tokens < 2:
        raise QGraphError(f"--new-tokens must be at least 2 (one prefill token and one decode step), got {new_tokens}")
    if rounds < 1:
        raise QGraphError(f"--rounds must be at least 1, got {rounds}")
    tmp.mkdir(parents=True, exist_ok=True)
    folder = model_folder(model, tmp)
    hf = load_model(folder)
    spec = spec_of(hf.config)
    weight_bytes = streamed_weight_bytes(hf)
    ctx = min(spec.max_positions, max(DEFAULT_CTX_LEN, prompt_len + new_tokens))
    raw = tmp / "raw.onnx"
    if not raw.is_file():
        say("exporting the plain model")
        export_model(hf, raw, exporter="dynamo", progress=say)
    art = tmp / "cpu"
    say(f"compiling the cpu artifact (prefill {prompt_len}, ctx_len {ctx})")
    compile_model(raw, "cpu", art, prefill_seq_len=prompt_len, ctx_len=ctx, batch_size=1, options={"threads": threads}, progress=say)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    raw_sess = ort.InferenceSession(str(raw), so, providers=["CPUExecutionProvider"])
    rt = Runtime(art, threads=threads)
    say("building the kernel ceiling (the decode graph's weight products alone)")
    decode_path = art / rt.manifest.spec("decode").file
    ceiling_path = tmp / "products-only.onnx"
    ceiling_feeds, n_products, ceiling_bytes = write_products_only(decode_path, ceiling_path)
    ceiling_sess = rt.target.create_session(ceiling_path, rt.options.target_options, threads=threads)
    remove_model_files(ceiling_path)  # the session holds its own (pre-packed) copy
    prompt = np.random.default_rng(0).integers(0, spec.vocab_size, prompt_len).tolist()

    def hf_run() -> tuple[float, float, list[int]]:
        return time_hf(hf, prompt, new_tokens)

    def ort_run() -> tuple[float, float, list[int]]:
        return time_ort_raw(raw_sess, spec, prompt, new_tokens)

    def qgraph_run(runtime: Any = rt) -> tuple[float, float, list[int]]:
        out = runtime.generate([prompt], max_new_tokens=new_tokens)
        return out.stats.ttft_s, out.stats.decode_s, out.tokens[0]

    def ort_ttft() -> float:
        return time_ort_raw(raw_sess, spec, prompt, 1)[0]

    def qgraph_ttft() -> float:
        return rt.generate([prompt], max_new_tokens=1).stats.ttft_s

    contenders: list[tuple[str, Timed]] = [
        ("huggingface-eager", hf_run), ("onnxruntime-plain-export", ort_run), ("qgraph-cpu", qgraph_run)]  # fmt: skip
    genai, notes = genai_contenders(folder, spec.family, tmp, ["fp32", *([quantize] if quantize else [])], threads, block_size,
                                     prompt, new_tokens, say)  # fmt: skip
    contenders += [c for c in genai if c[0] == "onnxruntime-genai"]
    quantized_weight_bytes = 0
    if quantize:
        # The vocabulary in its own mode (int4-rescore under int4 by default); when that differs from the rest, the artifact with it in the
        # same mode as the rest runs too (``-vocab-int4``): what the accuracy costs in speed, in the same run.
        runtimes = {}
        for v in dict.fromkeys([vocab, quantize]):
            art_q = tmp / f"cpu-{quantize}-vocab-{v}"
            say(f"compiling the {quantize} cpu artifact (block {block_size}, vocabulary {v})")
            compile_model(raw, "cpu", art_q, prefill_seq_len=prompt_len, ctx_len=ctx, batch_size=1, options={"threads": threads},
                          progress=say, quantize=quantize, quant_block_size=block_size, quant_vocab=v)  # fmt: skip
            runtimes[v] = Runtime(art_q, threads=threads)
        nbits = tmp / f"raw-matmulnbits-{quantize}-block{block_size}.onnx"  # reused when there, as the plain export is
        if not nbits.is_file():
            say(f"quantizing the plain export with ONNX Runtime's MatMulNBitsQuantizer ({quantize}, block {block_size})")
            quantize_plain_export(raw, nbits, quantize, block_size)
        nbits_sess = ort.InferenceSession(str(nbits), so, providers=["CPUExecutionProvider"])
        contenders += [(f"qgraph-cpu-{quantize}", lambda: qgraph_run(runtimes[vocab]))]
        if vocab != quantize:
            contenders += [(f"qgraph-cpu-{quantize}-vocab-{quantize}", lambda: qgraph_run(runtimes[quantize]))]
        contenders += [(f"onnxruntime-matmulnbits-{quantize}", lambda: time_ort_raw(nbits_sess, spec, prompt, new_tokens))]
        contenders += [c for c in genai if c[0] != "onnxruntime-genai"]
        products = weight_products(onnx.load(str(decode_path), load_external_data=False))
        vocab_bits, rescore_bits = VOCAB_MODES[vocab]
        quantized_weight_bytes = quantized_step_bytes(products, weight_bytes, BITS[quantize], block_size, vocab_bits,
                                                      rescored=rescore_bits is not None)  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in contenders}
    tokens: dict[str, list[int]] = {}
    bandwidths, engines, ceiling = [], [], []
    bound_model, bound_feeds = bound_product()  # 512 MiB of random weights, built once for every measurement of the bound

    def ceiling_run() -> float:
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            ceiling_sess.run(None, ceiling_feeds)
        return (time.perf_counter() - t) / (new_tokens - 1)

    for _, fn in contenders:  # warm-up
        fn()
    ceiling_run()
    for r in range(rounds):
        say(f"round {r + 1}/{rounds}")
        engines.append(bandwidth_by_engine(threads=threads, product=(bound_model, bound_feeds)))
        bandwidths.append(max(engines[-1].values()))
        for name, fn in contenders:
            # Let the previous contender's spinning worker threads go idle first.
            time.sleep(GENERATION_PAUSE_S)
            ttft, decode, toks = fn()
            runs[name].append({"ttft_s": ttft, "decode_s": decode})
            tokens[name] = toks
        time.sleep(0.5)
        ceiling.append(ceiling_run())
    say(f"alternating {PAIRS} decode steps, kernel-ceiling runs and runs of the bound's product")
    bound_path = tmp / "bound-product.onnx"
    onnx.save(bound_model, str(bound_path))
    # The runtime's session settings, so that no engine's idle threads slow the next one down.
    bound_sess = rt.target.create_session(bound_path, rt.options.target_options, threads=threads)
    bound_path.unlink()
    step_s, ceil_s, prod_s = paired_in_time(rt, [(ceiling_sess, ceiling_feeds), (bound_sess, bound_feeds)], prompt_len, ctx)
    bound_bytes = bound_feeds["w"].nbytes
    del bound_sess, bound_feeds
    say(f"alternating {ttft_pairs} qgraph and plain ONNX Runtime prefills")
    # A time to first token is one prefill, so the rounds give one sample per contender each; pairs within a
    # second steady the ratio. Each prefill waits TTFT_PAUSE_S first, as the contenders of a round do.
    q_ttft, o_ttft = in_turn([qgraph_ttft, ort_ttft], max(1, ttft_pairs), pause_s=TTFT_PAUSE_S)
    overhead_ms = statistics.median(s - c for s, c in zip(step_s, ceil_s)) * 1e3
    # ONNX Runtime runs the bound's product in the pairs; where numpy's BLAS streamed it faster in the rounds,
    # the bound is scaled up by that factor (never down), so the paired bound is as strict as the rounds' one.
    factor = statistics.median(max(1.0, e["numpy"] / e["onnxruntime"]) for e in engines)
    in_time_bound = [weight_bytes * p / bound_bytes / factor for p in prod_s]
    in_time = {
        "qgraph decode / bandwidth bound": statistics.median(b / s for b, s in zip(in_time_bound, step_s)),
        "kernel ceiling / bandwidth bound": statistics.median(b / c for b, c in zip(in_time_bound, ceil_s)),
        "bound ms per token": statistics.median(in_time_bound) * 1e3,
        "qgraph decode step ms": statistics.median(step_s) * 1e3,
        "engine factor": factor,
        "alternations": float(PAIRS),
        "qgraph TTFT / onnxruntime TTFT": statistics.median(q / o for q, o in zip(q_ttft, o_ttft)),
        "ttft alternations": float(ttft_pairs),
    }
    in_time.update(genai_in_time(dict(contenders), quantize, genai_pairs, say))
    bw = max(bandwidths)
    bound_ms = weight_bytes / bw * 1e3
    results = []
    for name, rs in runs.items():
        ttft = statistics.median(x["ttft_s"] for x in rs)
        decode = statistics.median(x["decode_s"] for x in rs)
        per_tok = decode / (new_tokens - 1)
        results.append(Result(name, ttft, 1 / per_tok, per_tok * 1e3, rs))
    by = {r.name: r for r in results}
    q = by["qgraph-cpu"]
    ratios: dict[str, float] = {}
    paired: dict[str, list[float]] = {}
    # Each ratio from the table's medians, and per round (contenders a few seconds apart), then their median.
    for key, a, b, kind in ratio_pairs(quantize):
        if a in by and b in by:
            x, y = by[a], by[b]
            if kind == "decode":
                ratios[key] = y.ms_per_token / x.ms_per_token
                paired[key] = [yr["decode_s"] / xr["decode_s"] for xr, yr in zip(x.runs, y.runs)]
            else:
                ratios[key] = x.ttft_s / y.ttft_s
                paired[key] = [xr["ttft_s"] / yr["ttft_s"] for xr, yr in zip(x.runs, y.runs)]
    ratios["qgraph decode / bandwidth bound"] = bound_ms / q.ms_per_token
    paired["qgraph decode / kernel ceiling"] = [c * (new_tokens - 1) / qr["decode_s"] for qr, c in zip(q.runs, ceiling)]
    # Each round's own bound (its best product, measured seconds before the contenders), not the best of all rounds.
    paired["qgraph decode / bandwidth bound"] = [weight_bytes / b * (new_tokens - 1) / qr["decode_s"] for qr, b in zip(q.runs, bandwidths)]
    quantized_bound_ms = quantized_weight_bytes / bw * 1e3
    if quantize:
        qq = by[f"qgraph-cpu-{quantize}"]
        key = f"qgraph {quantize} decode / {quantize} bandwidth bound"
        ratios[key] = quantized_bound_ms / qq.ms_per_token
        paired[key] = [quantized_weight_bytes / b * (new_tokens - 1) / qr["decode_s"] for qr, b in zip(qq.runs, bandwidths)]
    paired_ratios = {k: statistics.median(v) for k, v in paired.items()}
    ceiling_ms = statistics.median(ceiling) * 1e3
    ratios["qgraph decode / kernel ceiling"] = ceiling_ms / q.ms_per_token
    ratios["kernel ceiling / bandwidth bound"] = bound_ms / ceiling_ms
    fp32 = {n: t for n, t in tokens.items() if not (quantize and n.endswith(f"-{quantize}"))}
    agree = len({tuple(t) for t in fp32.values()}) == 1
    reference = tokens["huggingface-eager"]
    quantized_agree = {n: leading_agreement(t, reference) for n, t in tokens.items() if n not in fp32}
    return BenchReport(model, prompt_len, new_tokens, threads, int(weight_bytes), bw / 1e9, bound_ms, results, ratios, agree,
                       ceiling_ms, n_products, ceiling_bytes, overhead_ms, paired_ratios,
                       [b / 1e9 for b in bandwidths], [{k: v / 1e9 for k, v in e.items()} for e in engines], in_time,
                       quantize=quantize, quant_block_size=block_size if quantize else None, quant_vocab=vocab if quantize else None,
                       quantized_weight_bytes=int(quantized_weight_bytes), quantized_bound_ms_per_token=quantized_bound_ms,
                       quantized_tokens_agree=quantized_agree, notes=notes)  # fmt: skip


def genai_in_time(contenders: dict[str, Timed], quantize: str | None, count: int, say: Callable[[str], None]) -> dict[str, float]:
    """qgraph's decode against onnxruntime-genai's at each precision both ran at, whole generations taken in turn
    ``count`` times (:func:`in_turn`, GENERATION_PAUSE_S before each): the median of genai's decode seconds over qgraph's,
    under the rounds' ratio key; {} where genai did not run."""
    out: dict[str, float] = {}
    defaults = ("qgraph-cpu", f"qgraph-cpu-{quantize}")  # the artifacts in the default vocabulary mode
    for key, ours, theirs, kind in ratio_pairs(quantize):
        if kind != "decode" or ours not in defaults or not theirs.startswith("onnxruntime-genai"):
            continue
        if ours not in contenders or theirs not in contenders or count < 1:
            continue
        precision = theirs.removeprefix("onnxruntime-genai").removeprefix("-") or "fp32"
        say(f"alternating {count} whole generations of qgraph and onnxruntime-genai ({precision})")
        q, g = in_turn([lambda fn=contenders[ours]: fn()[1], lambda fn=contenders[theirs]: fn()[1]], count, pause_s=GENERATION_PAUSE_S)
        out[key] = statistics.median(b / a for a, b in zip(q, g))
    if out:
        out["genai alternations"] = float(count)
    return out
