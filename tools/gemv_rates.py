"""How fast ONNX Runtime streams fp32 weights through [1, K] x [K, N] products, by product size.

    python tools/gemv_rates.py [--shape KxN ...] [--prepacked] [--threads 2] [--spin 0] [--rounds 5] [--total-mib 450]

For each shape, independent products totalling about ``--total-mib`` MiB of
weights run in one session (the sequential executor runs them one by one); the
rate is weight bytes over the best of 6 runs, and the median over interleaved
rounds is printed. The weights are fed as inputs (ONNX Runtime's GEMV kernel
reads them as they are, as the runtime's bound weights); ``--prepacked`` also
runs them as initializers, which ONNX Runtime pre-packs (as every other
weight of a compiled artifact). GPT-2's layer shapes are small products; the
bandwidth bound of ``qgraph bench`` uses one 512 MiB product. See PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(768, 768), (768, 3072), (768, 12288), (3072, 12288), (10880, 10880)]


def session(
    k: int, n: int, total: int, threads: int, spin: str, rng: np.random.Generator, prepacked: bool = False
) -> tuple[ort.InferenceSession, dict, int]:
    count = max(1, total // (k * n * 4))
    weights = {f"w{i}": rng.standard_normal((k, n), dtype=np.float32) for i in range(count)}
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(count)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])]
    if not prepacked:
        inputs += [helper.make_tensor_value_info(f"w{i}", TensorProto.FLOAT, [k, n]) for i in range(count)]
    inits = [numpy_helper.from_array(w, name) for name, w in weights.items()] if prepacked else []
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]) for i in range(count)]
    model = helper.make_model(helper.make_graph(nodes, "gemv", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"x": np.ones((1, k), np.float32), **({} if prepacked else weights)}
    return sess, feeds, count * k * n * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spin", choices=["0", "1"], default="0", help="ONNX Runtime's allow_spinning (default 0, as the runtime)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--total-mib", type=int, default=450)
    ap.add_argument("--shape", action="append", default=None, help="KxN, repeatable (default: GPT-2's shapes and larger)")
    ap.add_argument("--prepacked", action="store_true", help="also run each shape as pre-packed initializers")
    args = ap.parse_args()
    shapes = [tuple(int(d) for d in s.lower().split("x")) for s in args.shape] if args.shape else SHAPES
    rng = np.random.default_rng(0)
    sessions = {}
    for k, n in shapes:
        for prepacked in (False, True) if args.prepacked else (False,):
            sessions[(k, n, "pre-packed" if prepacked else "fed")] = session(
                k, n, args.total_mib << 20, args.threads, args.spin, rng, prepacked
            )
    rates: dict[tuple[int, int, str], list[float]] = {key: [] for key in sessions}
    for _ in range(args.rounds):
        for key, (sess, feeds, nbytes) in sessions.items():
            sess.run(None, feeds)
            best = float("inf")
            for _ in range(6):
                t = time.perf_counter()
                sess.run(None, feeds)
                best = min(best, time.perf_counter() - t)
            rates[key].append(nbytes / best / 1e9)
            time.sleep(0.2)
    print(f"{'product':<16}{'weights':<12}{'MB each':>9}{'GB/s median':>13}{'best':>7}   ({args.threads} threads, spin {args.spin})")
    for (k, n, how), r in rates.items():
        print(f"{f'[{k}, {n}]':<16}{how:<12}{k * n * 4 / 1e6:>9.1f}{statistics.median(r):>13.1f}{max(r):>7.1f}")


if __name__ == "__main__":
    main()
