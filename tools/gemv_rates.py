"""How fast ONNX Runtime streams fp32 weights through [1, K] x [K, N] products, by product size.

    python tools/gemv_rates.py [--threads 2] [--spin 0] [--rounds 5] [--total-mib 450]

For each shape, independent products totalling about ``--total-mib`` MiB of
weights run in one session (the sequential executor runs them one by one); the
rate is weight bytes over the best of 6 runs, and the median over interleaved
rounds is printed. GPT-2's layer shapes are small products; the bandwidth
bound of ``qgraph bench`` uses one 512 MiB product. See PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

SHAPES = [(768, 768), (768, 3072), (768, 12288), (3072, 12288), (10880, 10880)]


def session(k: int, n: int, total: int, threads: int, spin: str, rng: np.random.Generator) -> tuple[ort.InferenceSession, dict, int]:
    count = max(1, total // (k * n * 4))
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(count)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])]
    inputs += [helper.make_tensor_value_info(f"w{i}", TensorProto.FLOAT, [k, n]) for i in range(count)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]) for i in range(count)]
    model = helper.make_model(helper.make_graph(nodes, "gemv", inputs, outputs), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"x": np.ones((1, k), np.float32), **{f"w{i}": rng.standard_normal((k, n), dtype=np.float32) for i in range(count)}}
    return sess, feeds, count * k * n * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spin", choices=["0", "1"], default="0", help="ONNX Runtime's allow_spinning (default 0, as the runtime)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--total-mib", type=int, default=450)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sessions = {shape: session(*shape, args.total_mib << 20, args.threads, args.spin, rng) for shape in SHAPES}
    rates: dict[tuple[int, int], list[float]] = {shape: [] for shape in SHAPES}
    for _ in range(args.rounds):
        for shape, (sess, feeds, nbytes) in sessions.items():
            sess.run(None, feeds)
            best = float("inf")
            for _ in range(6):
                t = time.perf_counter()
                sess.run(None, feeds)
                best = min(best, time.perf_counter() - t)
            rates[shape].append(nbytes / best / 1e9)
            time.sleep(0.2)
    print(f"{'product':<16}{'MB each':>9}{'GB/s median':>13}{'best':>7}   ({args.threads} threads, spin {args.spin})")
    for (k, n), r in rates.items():
        print(f"{f'[{k}, {n}]':<16}{k * n * 4 / 1e6:>9.1f}{statistics.median(r):>13.1f}{max(r):>7.1f}")


if __name__ == "__main__":
    main()
