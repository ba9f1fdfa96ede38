"""``qgraph bench``: decode speed against Hugging Face, plain ONNX Runtime and the memory bound.

On the same weights and in one run it measures:

* Hugging Face PyTorch eager (a prefill, then one forward per token with its cache);
* ONNX Runtime on the plain (raw) export, the presents fed back as numpy arrays;
* qgraph's compiled ``cpu`` artifact (the retained-state runtime);
* the memory-bandwidth bound: the best rate of a [1, K] x [K, N] fp32 product over
  512 MiB, which turns the model's weight bytes into a floor on the time per token;
* the kernel ceiling: the compiled decode graph's weight products (every MatMul
  and Gemm with a 2-D weight, in graph order, same shapes and layout) alone in one
  ONNX Runtime session with the runtime's settings, and nothing else: no
  attention, norms or cache. No ONNX Runtime CPU graph of this model can decode
  faster than its own products run, so this separates what the graph costs from
  what ONNX Runtime's kernels cost at these shapes.

Each contender runs ``rounds`` times, interleaved, and the median is reported, so
a noisy neighbour on a shared machine hurts all of them alike.

The bound of the table is the best rate seen in any round, while contenders
are medians; on a machine whose bandwidth swings by a quarter from minute to
minute, that compares qgraph's typical minute with the machine's best one. So
the bound is also measured *in time* with qgraph: one decode step, one run of
the products alone and one run of the bound's product, taken in turn (each
alternation within about 60 ms), their ratios taken within each alternation.
That product runs in ONNX Runtime with the runtime's settings; where numpy
streamed it faster in the rounds, the paired bound is scaled up by that factor.
The time to first token, one sample per round, is paired the same way: qgraph's
and plain ONNX Runtime's prefills taken in turn, 40 times.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qgraph.errors import QGraphError
from qgraph.frontend.families import ModelSpec, family_of, random_family, random_shapes, spec_of

log = logging.getLogger(__name__)

#: Alternations of one decode step, one kernel-ceiling run and one run of the bound's product (the three
#: taken in turn in each of their six orders), for the figures paired in time.
PAIRS = 120
#: Alternations of a qgraph prefill and a plain ONNX Runtime prefill for the TTFT paired in time, and the pause
#: before each (the plain session spins its idle workers for a while after a run, as ONNX Runtime does by default).
TTFT_PAIRS = 40
TTFT_PAUSE_S = 0.2

#: The project's performance targets (issue 6): (what, ratio key, "at least"/"at most", value, the contender the
#: decode target is relative to: its ms/token over the value is the time per token that meets it).
TARGETS: list[tuple[str, str, str, float, str]] = [
    ("decode vs Hugging Face eager", "qgraph decode / huggingface decode", "at least", 2.0, "huggingface-eager"),
    ("decode vs ONNX Runtime on the plain export", "qgraph decode / onnxruntime decode", "at least", 1.0, "onnxruntime-plain-export"),
    ("decode vs the bandwidth bound", "qgraph decode / bandwidth bound", "at least", 0.9, "bound"),
    ("TTFT vs ONNX Runtime on the plain export", "qgraph TTFT / onnxruntime TTFT", "at most", 1.0, ""),
]


@dataclass
class Result:
    name: str
    ttft_s: float
    decode_tokens_per_s: float
    ms_per_token: float
    runs: list[dict[str, float]] = field(default_factory=list)


@dataclass
class BenchReport:
    model: str
    prompt_len: int
    new_tokens: int
    threads: int
    weight_bytes: int
    bandwidth_gb_s: float
    bound_ms_per_token: float
    results: list[Result]
    ratios: dict[str, float]
    tokens_agree: bool
    #: ms per token of the decode graph's weight products alone (see the module docstring).
    kernel_ceiling_ms_per_token: float = 0.0
    #: how many products the ceiling runs, and their weight bytes.
    kernel_ceiling_products: int = 0
    kernel_ceiling_bytes: int = 0
    #: median of (one qgraph decode step - one kernel-ceiling run) over alternating pairs: the graph's own cost.
    graph_overhead_ms_per_token: float = 0.0
    #: the ratios computed within each round, then their median over rounds.
    paired_ratios: dict[str, float] = field(default_factory=dict)
    #: each round's bandwidth measurement (bandwidth_gb_s is the best of them).
    round_bandwidths_gb_s: list[float] = field(default_factory=list)
    #: each round's best rate of the bound's product per engine (GB/s): {"onnxruntime": .., "numpy": ..}.
    round_engine_bandwidths_gb_s: list[dict[str, float]] = field(default_factory=list)
    #: the bound measured at the same moment as the decode step: ratios over PAIRS alternations (see _paired_in_time).
    in_time: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": self.targets()}

    def targets(self) -> list[dict[str, Any]]:
        """Each of :data:`TARGETS` with the table's, the per-round and the in-time figure, and whether each meets it.

        ``met`` is the table's verdict. A decode target also gives ``needs_ms_per_token`` (the time per token that
        meets it) and ``needs_x_bound`` (that time as a multiple of the bound's speed: above 1 means reading the
        weights faster than the bound does).
        """
        ms = {r.name: r.ms_per_token for r in self.results} | {"bound": self.bound_ms_per_token}
        out = []
        for what, key, sense, value, rel in TARGETS:
            if key not in self.ratios:
                continue
            figures = {"table": self.ratios[key], "per_round": self.paired_ratios.get(key), "in_time": self.in_time.get(key)}
            t: dict[str, Any] = {"target": what, "ratio": key, sense.replace(" ", "_"): value, **figures}
            for name, v in figures.items():
                t[f"met_{name}" if name != "table" else "met"] = None if v is None else (v >= value if sense == "at least" else v <= value)
            if rel in ms:
                t["needs_ms_per_token"] = ms[rel] / value
                if rel != "bound":
                    t["needs_x_bound"] = self.bound_ms_per_token / t["needs_ms_per_token"]
            out.append(t)
        return out

    def table(self) -> str:
        lines = [
            f"model {self.model}: {self.weight_bytes / 1e6:.1f} MB of weights, prompt {self.prompt_len}, "
            f"{self.new_tokens} new tokens, {self.threads} threads",
            f"memory bandwidth {self.bandwidth_gb_s:.1f} GB/s -> bound {self.bound_ms_per_token:.2f} ms/token "
            f"({1000 / self.bound_ms_per_token:.1f} tokens/s)",
        ]
        if self.kernel_ceiling_ms_per_token:
            lines.append(
                f"kernel ceiling: the decode graph's {self.kernel_ceiling_products} weight products alone "
                f"({self.kernel_ceiling_bytes / 1e6:.1f} MB) take {self.kernel_ceiling_ms_per_token:.2f} ms/token in ONNX Runtime "
                f"({self.bound_ms_per_token / self.kernel_ceiling_ms_per_token:.2f}x bound); qgraph's decode step costs "
                f"{self.graph_overhead_ms_per_token:+.2f} ms more (median of {PAIRS} alternations)"
            )
        if self.in_time:
            t = self.in_time
            lines.append(
                f"paired in time ({PAIRS} alternations of a decode step, the products alone and the bound's product; "
                f"the product's rate scaled by {t['engine factor']:.3f}, numpy's best over ONNX Runtime's): "
                f"bound {t['bound ms per token']:.2f} ms/token, qgraph decode / bound {t['qgraph decode / bandwidth bound']:.2f}, "
                f"kernel ceiling / bound {t['kernel ceiling / bandwidth bound']:.2f}"
            )
            if "qgraph TTFT / onnxruntime TTFT" in t:
                lines.append(f"TTFT paired in time ({t['ttft alternations']:.0f} alternations of the two prefills, {TTFT_PAUSE_S} s apart): "
                             f"qgraph / onnxruntime {t['qgraph TTFT / onnxruntime TTFT']:.2f}")  # fmt: skip
        lines += [
            "",
            f"{'contender':<26}{'TTFT ms':>10}{'decode tok/s':>14}{'ms/token':>10}{'x bound':>9}",
        ]
        for r in self.results:
            lines.append(f"{r.name:<26}{r.ttft_s * 1e3:>10.1f}{r.decode_tokens_per_s:>14.1f}{r.ms_per_token:>10.2f}"
                         f"{self.bound_ms_per_token / r.ms_per_token:>9.2f}")  # fmt: skip
        lines.append("")
        lines += [f"{k}: {v:.2f}" + (f" (per round: {self.paired_ratios[k]:.2f})" if k in self.paired_ratios else "")
                  for k, v in self.ratios.items()]  # fmt: skip
        lines.append(f"greedy tokens identical across contenders: {'yes' if self.tokens_agree else 'NO'}")
        lines += ["", "targets (met or missed by the table's figure; per round and in time beside it):"]
        for t in self.targets():
            sense, value = ("at least", t["at_least"]) if "at_least" in t else ("at most", t["at_most"])
            extra = ", ".join(f"{k.replace('_', ' ')} {t[k]:.2f}" for k in ("per_round", "in_time") if t[k] is not None)
            line = f"  {t['target']}, {sense} {value:g}x: {t['table']:.2f}" + (f" ({extra})" if extra else "")
            line += " met" if t["met"] else " missed"
            if not t["met"] and "needs_ms_per_token" in t:
                line += f"; needs {t['needs_ms_per_token']:.2f} ms/token"
                line += f", {t['needs_x_bound']:.2f}x the bound's speed" if "needs_x_bound" in t else ""
            lines.append(line)
        return "\n".join(lines)


def _bound_product(mib: int = 512) -> tuple[Any, dict[str, np.ndarray]]:
    """The bound's product: a [1, K] x [K, K] fp32 MatMul over ``mib`` MiB, the weight fed as an input; (model, feeds)."""
    from onnx import TensorProto, helper

    k = int(np.sqrt(mib * 1024 * 1024 / 4))
    w = np.random.default_rng(0).standard_normal((k, k), dtype=np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "bw",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k]),
                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k])])  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model, {"x": np.ones((1, k), np.float32), "w": w}


def bandwidth_by_engine(
    mib: int = 512, repeats: int = 8, threads: int = 2, product: tuple[Any, dict[str, np.ndarray]] | None = None
) -> dict[str, float]:
    """Best read rate (bytes/s) of the bound's product in ONNX Runtime and in numpy (its BLAS), each engine apart.

    ``product``: a (model, feeds) of :func:`_bound_product` to reuse instead of building one of ``mib`` MiB."""
    import onnxruntime as ort

    model, feeds = product or _bound_product(mib)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x, w = feeds["x"], feeds["w"]
    best = {"onnxruntime": float("inf"), "numpy": float("inf")}
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        best["onnxruntime"] = min(best["onnxruntime"], time.perf_counter() - t)
    for _ in range(repeats):
        t = time.perf_counter()
        x @ w
        best["numpy"] = min(best["numpy"], time.perf_counter() - t)
    return {engine: w.nbytes / s for engine, s in best.items()}


def measure_bandwidth(mib: int = 512, repeats: int = 8, threads: int = 2) -> float:
    """Best read rate (bytes/s) of a [1, K] x [K, N] fp32 product over ``mib`` MiB: the better of ONNX Runtime and numpy."""
    return max(bandwidth_by_engine(mib, repeats, threads).values())


def write_products_only(decode_path: str | Path, out_path: str | Path, seed: int = 0) -> tuple[dict[str, np.ndarray], int, int]:
    """Write the decode graph's weight products alone to ``out_path``; returns (feeds, products, weight bytes).

    Every MatMul/Gemm whose second input is a 2-D float initializer is kept, in
    graph order, with the same weight shape and ``transB``. Weights are random
    (speed does not depend on fp32 values), written one at a time to an external
    data file next to ``out_path``, and pre-packed by ONNX Runtime like the real
    ones; a weight that is a 2-D graph input (bound by the runtime) is a graph
    input here too, fed with a random array. Each product reads a [1, K] input and is a graph output, so the
    sequential executor runs them one after another and none is dropped.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(decode_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    # Weights the runtime binds as inputs (the cpu target's large MatMul weights) are fed here too.
    fed_dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
                if i.type.tensor_type.elem_type == TensorProto.FLOAT and len(i.type.tensor_type.shape.dim) == 2}  # fmt: skip
    fed_feeds: dict[str, np.ndarray] = {}
    out_path = Path(out_path)
    data_name = out_path.name + ".data"
    rng = np.random.default_rng(seed)
    nodes, inputs, outputs, weights, seen_k = [], [], [], [], set()
    offset = nbytes = 0
    with open(out_path.parent / data_name, "wb") as data:
        for n in model.graph.node:
            if n.op_type not in ("MatMul", "Gemm") or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
                continue
            w = inits.get(n.input[1])
            dims = list(w.dims) if w is not None and w.data_type == TensorProto.FLOAT else fed_dims.get(n.input[1])
            if dims is None or len(dims) != 2 or not all(d > 0 for d in dims):
                continue
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0) if n.op_type == "Gemm" else 0
            k, n_out = (int(dims[1]), int(dims[0])) if trans_b else (int(dims[0]), int(dims[1]))
            i = len(nodes)
            if k not in seen_k:
                seen_k.add(k)
                inputs.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]))
            values = rng.uniform(-0.05, 0.05, size=tuple(dims)).astype(np.float32)
            if w is None:  # bound by the runtime: a graph input here too
                inputs.append(helper.make_tensor_value_info(f"w{i}", TensorProto.FLOAT, dims))
                fed_feeds[f"w{i}"] = values
            else:
                raw = values.tobytes()
                data.write(raw)
                t = TensorProto(name=f"w{i}", dims=dims, data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    t.external_data.add(key=key, value=value)
                weights.append(t)
                offset += len(raw)
            nbytes += values.nbytes
            attrs = {"transB": 1} if trans_b else {}
            nodes.append(helper.make_node("Gemm" if trans_b else "MatMul", [f"x{k}", f"w{i}"], [f"y{i}"], **attrs))
            outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n_out]))
    if not nodes:
        raise QGraphError(f"{decode_path} has no MatMul/Gemm with a 2-D float weight")
    m = helper.make_model(helper.make_graph(nodes, "products-only", inputs, outputs, weights),
                          opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    m.ir_version = 8
    onnx.save(m, str(out_path))
    feeds = {f"x{k}": np.ones((1, k), np.float32) for k in seen_k} | fed_feeds
    return feeds, len(nodes), nbytes


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
    from qgraph.ir.graph import remove_model_files
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
    ctx = min(spec.max_positions, max(128, prompt_len + new_tokens))
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
    ceiling_sess = rt.target.create_session(ceiling_path, rt.manifest.target_options, threads=threads)
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
    bound_model, bound_feeds = _bound_product()  # 512 MiB of random weights, built once for every measurement of the bound

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
    bound_sess = rt.target.create_session(bound_path, rt.manifest.target_options, threads=threads)
    bound_path.unlink()
    step_s, ceil_s, prod_s = _paired_in_time(rt, [(ceiling_sess, ceiling_feeds), (bound_sess, bound_feeds)], prompt_len, ctx)
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


def timed(fn: Callable[[], Any]) -> Callable[[], float]:
    """``fn`` made to return the seconds it took."""

    def run() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return run


def in_turn(sides: Sequence[Callable[[], float]], count: int, pause_s: float = 0.0) -> list[list[float]]:
    """What each side returns, the sides taken in turn ``count`` times; one list per side.

    Each turn runs within a short time, so a slow minute on a shared machine
    slows every side alike; the order of the sides goes through all their
    permutations (two sides: the first alternates), as the second of two
    back-to-back runs may gain or lose from the first. ``pause_s``: a sleep
    before each run. Take differences and ratios within each turn.
    """
    orders = list(itertools.permutations(range(len(sides))))
    out: list[list[float]] = [[] for _ in sides]
    for i in range(count):
        for side in orders[i % len(orders)]:
            if pause_s:
                time.sleep(pause_s)
            out[side].append(sides[side]())
    return out


def _paired_in_time(rt: Any, others: list[tuple[Any, dict[str, np.ndarray]]], prompt_len: int, ctx: int) -> list[list[float]]:
    """Seconds of one qgraph decode step and of one run of each other session, taken in turn ``PAIRS`` times
    (:func:`in_turn`); one list per side, the decode step first. The step's position moves on each turn."""
    ids = np.zeros((rt.batch_size, 1), np.int64)
    turns = itertools.count()

    def step() -> None:
        pos = np.full((rt.batch_size, 1), prompt_len + next(turns) % max(1, ctx - prompt_len), np.int64)
        rt.step("decode", ids, pos)

    runs = [timed(lambda sess=sess, feeds=feeds: sess.run(None, feeds)) for sess, feeds in others]
    return in_turn([timed(step), *runs], PAIRS)


def save_plot(report: BenchReport, path: str | Path) -> None:
    """A bar chart of decode tokens/s per contender, with the bound as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QGraphError("--plot needs matplotlib: pip install matplotlib") from None
    names = [r.name for r in report.results]
    values = [r.decode_tokens_per_s for r in report.results]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, values, color=["#999999", "#6699cc", "#cc6633"])
    ax.axhline(1000 / report.bound_ms_per_token, color="black", linestyle="--", label="memory-bandwidth bound")
    if report.kernel_ceiling_ms_per_token:
        ax.axhline(1000 / report.kernel_ceiling_ms_per_token, color="gray", linestyle=":", label="kernel ceiling (products alone)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{report.model}: prompt {report.prompt_len}, {report.new_tokens} tokens, {report.threads} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(report: BenchReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2))
