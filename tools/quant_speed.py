"""Decode speed of weight-only quantization: qgraph fp32, int8, int4 and ONNX Runtime's MatMulNBits path, interleaved.

    python tools/quant_speed.py [--model random:gpt2] [--workdir DIR] [--rounds 5] [--threads 2] [--json]

On one model (random weights by default, the gpt2-small shape) and in one run:
qgraph's cpu artifact in fp32, ``--quantize int8`` and ``--quantize int4``, and
ONNX Runtime on the plain export in fp32 and after its own ``MatMulNBitsQuantizer``
(int8 and int4, block 32, symmetric, accuracy level 4) with every Gemm turned
into MatMul + Add first (the quantizer skips Gemm, which both exporters write for
GPT-2), so that anchor is its best; the quantizer leaves the vocabulary
projection (dynamo's ``Transpose(embedding)``) in fp32. Each round takes one
prefill of ``--prompt-len`` tokens of every contender in turn (the time to first
token), then ``--new-tokens`` - 1 decode steps, one step of every contender in
turn (the order rotates), so a noisy neighbour on a shared machine slows all of
them alike; the medians are printed with the ratios the issue asks for, each
artifact's bytes, and how many greedy tokens agree with qgraph fp32 (one whole
generation each). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
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


class Plain:
    """A plain (growing-cache) export in ONNX Runtime: a prefill, then one decode step at a time."""

    def __init__(self, path: Path, spec: Any, prompt: list[int], threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs()]
        self.spec, self.prompt = spec, prompt
        self.out: dict[str, np.ndarray] = {}
        self.length = 0

    def prefill(self) -> int:
        spec, n = self.spec, len(self.prompt)
        past = {f"past_{kv}.{i}": np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
                for i in range(spec.num_layers) for kv in ("key", "value")}  # fmt: skip
        feeds = {"input_ids": np.array([self.prompt], np.int64), "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n)[None], **past}  # fmt: skip
        self.out = dict(zip(self.names, self.sess.run(None, feeds)))
        self.length = n
        return int(self.out["logits"][0, -1].argmax())

    def step(self, token: int = 0) -> int:
        past = {"past" + k[7:]: v for k, v in self.out.items() if k.startswith("present")}
        feeds = {"input_ids": np.array([[token]], np.int64), "attention_mask": np.ones((1, self.length + 1), np.int64),
                 "position_ids": np.array([[self.length]], np.int64), **past}  # fmt: skip
        self.out = dict(zip(self.names, self.sess.run(None, feeds)))
        self.length += 1
        return int(self.out["logits"][0, -1].argmax())

    def greedy(self, n: int) -> list[int]:
        toks = [self.prefill()]
        while len(toks) < n:
            toks.append(self.step(toks[-1]))
        return toks


class Qgraph:
    """A qgraph cpu artifact: the runtime's prefill, then one decode step at a time."""

    def __init__(self, art: Path, prompt: list[int], threads: int) -> None:
        from qgraph.runtime import Runtime

        self.rt, self.prompt = Runtime(art, threads=threads), prompt
        self.pos = 0

    def prefill(self) -> int:
        self.pos = len(self.prompt)
        return int(self.rt.generate([self.prompt], max_new_tokens=1).tokens[0][0])

    def step(self, token: int = 0) -> int:
        logits = self.rt.step("decode", np.array([[token]], np.int64), np.array([[self.pos]], np.int64))
        self.pos += 1
        return int(logits[0, -1].argmax())

    def greedy(self, n: int) -> list[int]:
        return list(self.rt.generate([self.prompt], max_new_tokens=n).tokens[0])


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
    runners: dict[str, Any] = {f"qgraph-{k}": Qgraph(v, prompt, args.threads) for k, v in arts.items()}
    runners |= {f"ort-plain-{k}": Plain(v, spec, prompt, args.threads) for k, v in plain.items()}
    tokens = {k: r.greedy(args.new_tokens) for k, r in runners.items()}  # also the warm-up
    names = list(runners)
    ttfts: dict[str, list[float]] = {k: [] for k in names}
    steps: dict[str, list[float]] = {k: [] for k in names}
    turn = 0
    for r in range(args.rounds):
        say(f"round {r + 1}/{args.rounds}")
        for k in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(0.2)  # the previous prefill's spinning workers go idle
            t = time.perf_counter()
            runners[k].prefill()
            ttfts[k].append(time.perf_counter() - t)
        for _ in range(args.new_tokens - 1):
            turn += 1
            for k in names[turn % len(names) :] + names[: turn % len(names)]:
                t = time.perf_counter()
                runners[k].step()
                steps[k].append(time.perf_counter() - t)
    runs = {k: {"ttft_s": ttfts[k], "step_s": steps[k]} for k in names}
    med = {k: (statistics.median(ttfts[k]) * 1e3, statistics.median(steps[k]) * 1e3) for k in names}
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
    print(f"{args.model}, {args.threads} threads, prompt {args.prompt_len}, {args.new_tokens} tokens, {args.rounds} rounds, medians")
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
