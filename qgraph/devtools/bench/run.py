"""The contenders (Hugging Face eager, ONNX Runtime on the plain export, qgraph's cpu artifact) and :func:`run_bench`, which measures them in rounds against the bound and the kernel ceiling."""

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

from qgraph.devtools.bench.bound import bandwidth_by_engine, bound_product, write_products_only
from qgraph.devtools.bench.report import BenchReport, Result
from qgraph.devtools.bench.timing import PAIRS, TTFT_PAIRS, TTFT_PAUSE_S, in_turn, paired_in_time
from qgraph.errors import QGraphError
from qgraph.frontend.families import ModelSpec, family_of, random_family, random_shapes, spec_of
from qgraph.pipeline.options import DEFAULT_CTX_LEN

log = logging.getLogger(__name__)


def _time_hf(model: Any, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        past, toks = out.past_key_values, [tok]
        t1 = time.perf_counter()
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            toks.append(tok)
        return ttft, time.perf_counter() - t1, toks


def _time_ort_raw(sess: Any, spec: ModelSpec, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    names = [o.name for o in sess.get_outputs()]
    past = {f"past_{kv}.{i}": np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
            for i in range(spec.num_layers) for kv in ("key", "value")}  # fmt: skip
    t0 = time.perf_counter()
    ids = np.array([prompt], np.int64)
    length = len(prompt)
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, length), np.int64), "position_ids": np.arange(length)[None], **past}
    out = dict(zip(names, sess.run(None, feeds)))
    tok = int(out["logits"][0, -1].argmax())
    ttft = time.perf_counter() - t0
    toks = [tok]
    t1 = time.perf_counter()
    for _ in range(n - 1):
        past = {k: out["present" + k[4:]] for k in past}
        feeds = {"input_ids": np.array([[tok]], np.int64), "attention_mask": np.ones((1, length + 1), np.int64),
                 "position_ids": np.array([[length]], np.int64), **past}  # fmt: skip
        out = dict(zip(names, sess.run(None, feeds)))
        tok = int(out["logits"][0, -1].argmax())
        toks.append(tok)
        length += 1
    return ttft, time.perf_counter() - t1, toks


def _model_folder(model: str, workdir: Path) -> str:
    """A hub id / folder / tiny-gpt2 as is; ``random:NAME`` saved to a folder with random weights."""
    if not model.startswith("random:"):
        return model
    found = random_family(model.split(":", 1)[1])
    if found is None:
        raise QGraphError(f"unknown random model '{model}'; choose random:{'|random:'.join(random_shapes())}")
    family, shape = found
    return str(family.save_random(shape, workdir / model.replace(":", "-")))


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
) -> BenchReport:
    """Measure every contender (see the module docstring); returns the report."""
    import torch

    say = progress or (lambda m: log.info("%s", m))
    torch.set_num_threads(threads)
    own_tmp = workdir is None
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="qgraph-bench-"))
    try:
        return _run_bench(model, tmp, prompt_len, new_tokens, rounds, threads, say, ttft_pairs)
    finally:
        if own_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _run_bench(model: str, tmp: Path, prompt_len: int, new_tokens: int, rounds: int, threads: int,
               say: Callable[[str], None], ttft_pairs: int) -> BenchReport:  # fmt: skip
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
    folder = _model_folder(model, tmp)
    hf = load_model(folder)
    spec = spec_of(hf.config)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters()) - family_of(hf.config).unread_weight_bytes(hf)
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
    ceiling_path = tmp / "products-only.onnx"
    ceiling_feeds, n_products, ceiling_bytes = write_products_only(art / rt.manifest.spec("decode").file, ceiling_path)
    ceiling_sess = rt.target.create_session(ceiling_path, rt.options.target_options, threads=threads)
    remove_model_files(ceiling_path)  # the session holds its own (pre-packed) copy
    prompt = np.random.default_rng(0).integers(0, spec.vocab_size, prompt_len).tolist()

    def hf_run() -> tuple[float, float, list[int]]:
        return _time_hf(hf, prompt, new_tokens)

    def ort_run() -> tuple[float, float, list[int]]:
        return _time_ort_raw(raw_sess, spec, prompt, new_tokens)

    def qgraph_run() -> tuple[float, float, list[int]]:
        out = rt.generate([prompt], max_new_tokens=new_tokens)
        return out.stats.ttft_s, out.stats.decode_s, out.tokens[0]

    def ort_ttft() -> float:
        return _time_ort_raw(raw_sess, spec, prompt, 1)[0]

    def qgraph_ttft() -> float:
        return rt.generate([prompt], max_new_tokens=1).stats.ttft_s

    contenders: list[tuple[str, Callable[[], tuple[float, float, list[int]]]]] = [
        ("huggingface-eager", hf_run), ("onnxruntime-plain-export", ort_run), ("qgraph-cpu", qgraph_run)]  # fmt: skip
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
            time.sleep(0.5)
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
    bw = max(bandwidths)
    bound_ms = weight_bytes / bw * 1e3
    results = []
    for name, rs in runs.items():
        ttft = statistics.median(x["ttft_s"] for x in rs)
        decode = statistics.median(x["decode_s"] for x in rs)
        per_tok = decode / (new_tokens - 1)
        results.append(Result(name, ttft, 1 / per_tok, per_tok * 1e3, rs))
    by = {r.name: r for r in results}
    q, o, h = by["qgraph-cpu"], by["onnxruntime-plain-export"], by["huggingface-eager"]
    ratios = {
        "qgraph decode / huggingface decode": q.decode_tokens_per_s / h.decode_tokens_per_s,
        "qgraph decode / onnxruntime decode": q.decode_tokens_per_s / o.decode_tokens_per_s,
        "qgraph decode / bandwidth bound": q.decode_tokens_per_s / (1000 / bound_ms),
        "qgraph TTFT / onnxruntime TTFT": q.ttft_s / o.ttft_s,
    }
    ceiling_ms = statistics.median(ceiling) * 1e3
    # The same ratios per round (contenders a few seconds apart), then their median: steadier on a shared machine.
    paired = {
        "qgraph decode / huggingface decode": [hr["decode_s"] / qr["decode_s"] for qr, hr in zip(q.runs, h.runs)],
        "qgraph decode / onnxruntime decode": [orr["decode_s"] / qr["decode_s"] for qr, orr in zip(q.runs, o.runs)],
        "qgraph TTFT / onnxruntime TTFT": [qr["ttft_s"] / orr["ttft_s"] for qr, orr in zip(q.runs, o.runs)],
        "qgraph decode / kernel ceiling": [c * (new_tokens - 1) / qr["decode_s"] for qr, c in zip(q.runs, ceiling)],
        # Each round's own bound (its best product, measured seconds before the contenders), not the best of all rounds.
        "qgraph decode / bandwidth bound": [weight_bytes / b * (new_tokens - 1) / qr["decode_s"] for qr, b in zip(q.runs, bandwidths)],
    }
    paired_ratios = {k: statistics.median(v) for k, v in paired.items()}
    ratios["qgraph decode / kernel ceiling"] = ceiling_ms / q.ms_per_token
    ratios["kernel ceiling / bandwidth bound"] = bound_ms / ceiling_ms
    agree = len({tuple(t) for t in tokens.values()}) == 1
    return BenchReport(model, prompt_len, new_tokens, threads, int(weight_bytes), bw / 1e9, bound_ms, results, ratios, agree,
                       ceiling_ms, n_products, ceiling_bytes, overhead_ms, paired_ratios,
                       [b / 1e9 for b in bandwidths], [{k: v / 1e9 for k, v in e.items()} for e in engines], in_time)  # fmt: skip
