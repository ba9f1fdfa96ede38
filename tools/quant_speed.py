"""Decode speed of weight-only quantization: qgraph fp32, int8, int4 and ONNX Runtime's MatMulNBits path, interleaved.

    python tools/quant_speed.py [--model random:gpt2] [--workdir DIR] [--rounds 5] [--threads 2] [--json]

On one model (random weights by default, the gpt2-small shape) and in one run:
qgraph's cpu artifact in fp32, ``--quantize int8`` and ``--quantize int4``, and
ONNX Runtime on the plain export in fp32 and after its own ``MatMulNBitsQuantizer``
(int8 and int4, block 32, symmetric, accuracy level 4) with every Gemm turned
into MatMul + Add first (the quantizer skips Gemm, which both exporters write for
GPT-2), so that anchor is its best; the quantizer leaves the vocabulary
projection (dynamo's ``Transpose(embedding)``) in fp32. Each round runs every
contender once (a prefill of ``--prompt-len`` tokens, then ``--new-tokens``
greedy tokens), in turn, and the medians are printed with the ratios the issue
asks for, plus each artifact's bytes. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def gemm_to_matmul(model: Any) -> Any:
    """``Gemm(a, B, C)`` (transA 0, alpha = beta = 1, B an initializer) -> ``MatMul(a, B or B^T) + C``, in place."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            nodes.append(n)
            continue
        b = n.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[b]).T.copy()
            b = b + "_t"
            model.graph.initializer.append(numpy_helper.from_array(w, b))
        out = n.output[0] if len(n.input) < 3 else n.output[0] + "_mm"
        nodes.append(helper.make_node("MatMul", [n.input[0], b], [out], name=n.name + "_mm"))
        if len(n.input) >= 3:
            nodes.append(helper.make_node("Add", [out, n.input[2]], [n.output[0]], name=n.name + "_add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def ort_matmul_nbits(raw: Path, out: Path, bits: int) -> Path:
    """The plain export with ONNX Runtime's MatMulNBits quantizer applied (after the Gemm -> MatMul conversion)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if out.is_file():
        return out
    model = gemm_to_matmul(onnx.load(str(raw)))
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=bits)
    q = MatMulNBitsQuantizer(model, algo_config=config)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=True)
    return out


def plain_runner(path: Path, spec: Any, prompt: list[int], n: int, threads: int) -> Callable[[], tuple[float, float, list[int]]]:
    """A prefill and ``n - 1`` decode steps of a plain (growing-cache) export: (ttft_s, decode_s, tokens)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]

    def run() -> tuple[float, float, list[int]]:
        past = {f"past_{kv}.{i}": np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
                for i in range(spec.num_layers) for kv in ("key", "value")}  # fmt: skip
        length = len(prompt)
        t0 = time.perf_counter()
        feeds = {"input_ids": np.array([prompt], np.int64), "attention_mask": np.ones((1, length), np.int64),
                 "position_ids": np.arange(length)[None], **past}  # fmt: skip
        out = dict(zip(names, sess.run(None, feeds)))
        toks = [int(out["logits"][0, -1].argmax())]
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(n - 1):
            past = {k: out["present" + k[4:]] for k in past}
            feeds = {"input_ids": np.array([[toks[-1]]], np.int64), "attention_mask": np.ones((1, length + 1), np.int64),
                     "position_ids": np.array([[length]], np.int64), **past}  # fmt: skip
            out = dict(zip(names, sess.run(None, feeds)))
            toks.append(int(out["logits"][0, -1].argmax()))
            length += 1
        return ttft, time.perf_counter() - t1, toks

    return run


def qgraph_runner(art: Path, prompt: list[int], n: int, threads: int) -> Callable[[], tuple[float, float, list[int]]]:
    from qgraph.runtime import Runtime

    rt = Runtime(art, threads=threads)

    def run() -> tuple[float, float, list[int]]:
        out = rt.generate([prompt], max_new_tokens=n)
        return out.stats.ttft_s, out.stats.decode_s, out.tokens[0]

    return run


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:gpt2", help="random:gpt2 (default) or a folder / hub id / tiny-gpt2")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the export and artifacts here (reused)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from qgraph.compile import compile_model
    from qgraph.frontend.export import export_model
    from qgraph.frontend.families import random_family, spec_of
    from qgraph.frontend.hf import load_config

    def say(msg: str) -> None:
        print(f"[quant_speed] {msg}", file=sys.stderr, flush=True)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="quant-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model.startswith("random:"):
        found = random_family(model.split(":", 1)[1])
        if found is None:
            raise SystemExit(f"unknown random model {model}")
        family, shape = found
        folder = work / model.replace(":", "-")
        if not (folder / "config.json").is_file():
            family.save_random(shape, folder)
        model = str(folder)
    spec = spec_of(load_config(model))
    raw = work / "raw.onnx"
    if not raw.is_file():
        say("exporting the plain model (dynamo)")
        export_model(model, raw, exporter="dynamo", progress=say)
    ctx = min(spec.max_positions, max(128, args.prompt_len + args.new_tokens))
    arts: dict[str, Path] = {}
    for q in (None, "int8", "int4"):
        art = work / f"cpu-{q or 'fp32'}"
        if not (art / "manifest.json").is_file():
            say(f"compiling the qgraph cpu artifact ({q or 'fp32'})")
            t = time.perf_counter()
            compile_model(raw, "cpu", art, prefill_seq_len=args.prompt_len, ctx_len=ctx, batch_size=1, options={"threads": args.threads},
                          quantize=q, quant_block_size=args.block_size if q else None)  # fmt: skip
            say(f"  {time.perf_counter() - t:.1f} s")
        arts[q or "fp32"] = art
    plain = {"fp32": raw}
    for bits in (8, 4):
        say(f"ONNX Runtime's MatMulNBitsQuantizer, int{bits}")
        plain[f"int{bits}"] = ort_matmul_nbits(raw, work / f"ort-int{bits}.onnx", bits)

    prompt = np.random.default_rng(0).integers(0, spec.vocab_size, args.prompt_len).tolist()
    runners = {f"qgraph-{k}": qgraph_runner(v, prompt, args.new_tokens, args.threads) for k, v in arts.items()}
    runners |= {f"ort-plain-{k}": plain_runner(v, spec, prompt, args.new_tokens, args.threads) for k, v in plain.items()}
    for fn in runners.values():
        fn()  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):
        say(f"round {r + 1}/{args.rounds}")
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            time.sleep(0.3)
            ttft, decode, toks = runners[name]()
            runs[name].append((ttft, decode / (args.new_tokens - 1)))
            tokens[name] = toks
    med = {k: (statistics.median(t for t, _ in v) * 1e3, statistics.median(d for _, d in v) * 1e3) for k, v in runs.items()}
    sizes = {f"qgraph-{k}": folder_bytes(v) for k, v in arts.items()}
    ratios = {
        "int4_over_qgraph_fp32": med["qgraph-fp32"][1] / med["qgraph-int4"][1],
        "int4_over_ort_matmulnbits_int4": med["ort-plain-int4"][1] / med["qgraph-int4"][1],
        "int8_over_qgraph_fp32": med["qgraph-fp32"][1] / med["qgraph-int8"][1],
        "ttft_int4_over_fp32": med["qgraph-int4"][0] / med["qgraph-fp32"][0],
        "ttft_int8_over_fp32": med["qgraph-int8"][0] / med["qgraph-fp32"][0],
        "artifact_int4_over_fp32": sizes["qgraph-int4"] / sizes["qgraph-fp32"],
        "artifact_int8_over_fp32": sizes["qgraph-int8"] / sizes["qgraph-fp32"],
    }
    agree = {k: sum(a == b for a, b in zip(v, tokens["qgraph-fp32"])) / len(v) for k, v in tokens.items()}
    if args.json:
        print(json.dumps({"ms": med, "runs": runs, "bytes": sizes, "ratios": ratios, "token_agreement_with_fp32": agree}))
        return 0
    print(f"{args.model}, {args.threads} threads, prompt {args.prompt_len}, {args.new_tokens} tokens, median of {args.rounds} rounds")
    print(f"{'contender':24} {'decode ms/token':>16} {'TTFT ms':>9} {'tokens = fp32':>14}")
    for k, (ttft, dec) in med.items():
        print(f"{k:24} {dec:16.2f} {ttft:9.2f} {agree[k]:14.2f}")
    for k, v in sizes.items():
        print(f"{k} artifact: {v / 2**20:.1f} MiB")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
