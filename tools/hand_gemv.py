"""A hand-written fp32 GEMV against ONNX Runtime's, paired in time: is the kernel what holds decode back?

    python tools/hand_gemv.py [--shape gpt2] [--alternations 60] [--threads 2] [--bound-mib 512]

Decoding one token reads every weight once through [1, K] x [K, N] products. This
tool compiles a small C kernel (gcc with OpenMP and GCC's vector extensions,
``-O3 -march=native``; each weight packed once into 64-column panels that are
read front to back), loads it with ctypes, and times it against ONNX Runtime on
the same products (GPT-2's 4 per layer and the vocabulary projection; the
layer weights pre-packed by ONNX Runtime, the vocabulary weight fed, as in the
``cpu`` target), one run of each in turn, so that a noisy minute slows both.
It also pairs the kernel's products with the kernel's own single product over
``--bound-mib`` MiB, the shape of ``qgraph bench``'s bandwidth bound.

Printed: the median time of each side, the median of the per-alternation
ratios, and GB/s. The kernel's threads wait passively (``OMP_WAIT_POLICY``),
so they never spin into ONNX Runtime's run; that costs the kernel a wake-up
per product. Needs gcc; the results are in PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PANEL = 64

C_SOURCE = r"""
#include <stdlib.h>
#include <string.h>
typedef float v16 __attribute__((vector_size(64), aligned(64)));
#define P 64
typedef struct { int k, n, out; float *w; } prod_t;
static prod_t prods[1024];
static int count;

/* Pack src [k, n] (row-major) into panels [ceil(n/P)][k][P], zero-padded; returns the product's output offset. */
int qg_add(const float *src, int k, int n) {
    int panels = (n + P - 1) / P, out = count ? prods[count - 1].out + (prods[count - 1].n + P - 1) / P * P : 0;
    float *w = aligned_alloc(64, (size_t)panels * k * P * sizeof(float));
    if (!w || count == 1024) return -1;
    for (int p = 0; p < panels; p++) {
        int cols = n - p * P < P ? n - p * P : P;
        for (int i = 0; i < k; i++) {
            float *dst = w + ((size_t)p * k + i) * P;
            memcpy(dst, src + (size_t)i * n + (size_t)p * P, cols * sizeof(float));
            memset(dst + cols, 0, (P - cols) * sizeof(float));
        }
    }
    prods[count] = (prod_t){k, n, out, w};
    return prods[count++].out;
}

static void panel(const float *x, const float *w, int k, float *y) {
    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (int i = 0; i < k; i++) {
        const v16 *r = (const v16 *)(w + (size_t)i * P);
        float s = x[i];
        a0 += s * r[0]; a1 += s * r[1]; a2 += s * r[2]; a3 += s * r[3];
    }
    memcpy(y, &a0, 64); memcpy(y + 16, &a1, 64); memcpy(y + 32, &a2, 64); memcpy(y + 48, &a3, 64);
}

/* Every product, in order: y[out : out + padded n] = x[:k] @ W. */
void qg_run(const float *x, float *y, int threads) {
    #pragma omp parallel num_threads(threads)
    for (int j = 0; j < count; j++) {
        int panels = (prods[j].n + P - 1) / P, k = prods[j].k;
        #pragma omp for schedule(static)
        for (int p = 0; p < panels; p++)
            panel(x, prods[j].w + (size_t)p * k * P, k, y + prods[j].out + p * P);
    }
}

void qg_clear(void) {
    for (int j = 0; j < count; j++) free(prods[j].w);
    count = 0;
}
"""


class HandGemv:
    """The compiled kernel over a list of weights; ``run(x)`` returns each product's [N] output."""

    loaded = 0  # each instance loads its own copy of the library (the list of products is a C global)

    def __init__(self, weights: list[np.ndarray], threads: int, workdir: Path) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # read when libgomp starts its threads
        HandGemv.loaded += 1
        src, lib = workdir / "hand_gemv.c", workdir / f"libhand_gemv{HandGemv.loaded}.so"
        src.write_text(C_SOURCE)
        cmd = ["gcc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(lib)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise SystemExit("hand_gemv needs gcc on PATH") from None
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"gcc failed:\n{e.stderr}") from None
        self.lib = ctypes.CDLL(str(lib))
        self.lib.qg_add.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self.lib.qg_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self.threads = threads
        self.slices = []
        for w in weights:
            w = np.ascontiguousarray(w, np.float32)
            out = self.lib.qg_add(w.ctypes.data, w.shape[0], w.shape[1])
            if out < 0:
                raise MemoryError("hand_gemv could not pack a weight")
            self.slices.append((out, w.shape[1]))
        self.k = max(w.shape[0] for w in weights)
        end = self.slices[-1][0] + -(-self.slices[-1][1] // PANEL) * PANEL
        self.y = np.zeros(end, np.float32)

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, np.float32)
        self.lib.qg_run(x.ctypes.data, self.y.ctypes.data, self.threads)
        return [self.y[o : o + n] for o, n in self.slices]

    def close(self) -> None:
        self.lib.qg_clear()


def gpt2_weights(n_layer: int, d: int, vocab: int, rng: np.random.Generator) -> list[np.ndarray]:
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * n_layer + [(d, vocab)]
    return [rng.uniform(-0.05, 0.05, s).astype(np.float32) for s in shapes]


def ort_products(weights: list[np.ndarray], threads: int, workdir: Path, feed_min_bytes: int = 32 << 20):
    """One ONNX Runtime session running every product, as the cpu target does: small weights pre-packed, large ones fed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qgraph.targets import get_target

    ks = sorted({w.shape[0] for w in weights})
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in ks]
    nodes, inits, outputs, feeds = [], [], [], {f"x{k}": np.ones((1, k), np.float32) for k in ks}
    for i, w in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [f"x{w.shape[0]}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, w.shape[1]]))
        if w.nbytes >= feed_min_bytes:
            inputs.append(helper.make_tensor_value_info(f"w{i}", TensorProto.FLOAT, list(w.shape)))
            feeds[f"w{i}"] = w
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
    model = helper.make_model(helper.make_graph(nodes, "products", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = workdir / "products.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="products.onnx.data")
    sess = get_target("cpu").create_session(path, {}, threads=threads)
    return sess, feeds


def main() -> None:
    from qgraph.devtools.bench import in_turn, timed
    from qgraph.frontend.families.gpt2 import RANDOM_SHAPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2", choices=sorted(RANDOM_SHAPES))
    ap.add_argument("--alternations", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bound-mib", type=int, default=512)
    args = ap.parse_args()
    shape = RANDOM_SHAPES[args.shape]
    weights = gpt2_weights(shape["n_layer"], shape["n_embd"], 50257, np.random.default_rng(0))
    nbytes = sum(w.nbytes for w in weights)
    x = np.ones(max(w.shape[0] for w in weights), np.float32)
    with tempfile.TemporaryDirectory(prefix="qgraph-hand-gemv-") as tmp:
        sess, feeds = ort_products(weights, args.threads, Path(tmp))
        hand = HandGemv(weights, args.threads, Path(tmp))
        got = hand.run(x)
        want = sess.run(None, feeds)
        worst = max(float(np.max(np.abs(g - w[0]))) for g, w in zip(got, want))
        print(f"{len(weights)} products, {nbytes / 1e6:.1f} MB; hand kernel against ONNX Runtime: max |diff| {worst:.2e}")
        t_ort, t_hand = in_turn([timed(lambda: sess.run(None, feeds)), timed(lambda: hand.run(x))], args.alternations)
        ratio = statistics.median(o / h for o, h in zip(t_ort, t_hand))
        print(f"ONNX Runtime {statistics.median(t_ort) * 1e3:.2f} ms ({nbytes / statistics.median(t_ort) / 1e9:.1f} GB/s), "
              f"hand kernel {statistics.median(t_hand) * 1e3:.2f} ms ({nbytes / statistics.median(t_hand) / 1e9:.1f} GB/s); "
              f"ONNX Runtime / hand, paired: {ratio:.3f}")  # fmt: skip
        k = int(np.sqrt(args.bound_mib * 1024 * 1024 / 4))
        big = HandGemv([np.random.default_rng(1).standard_normal((k, k), dtype=np.float32)], args.threads, Path(tmp))
        xb = np.ones(k, np.float32)
        t_small, t_big = in_turn([timed(lambda: hand.run(x)), timed(lambda: big.run(xb))], args.alternations)
        rates = [(nbytes / s) / (k * k * 4 / b) for s, b in zip(t_small, t_big)]
        print(f"hand kernel: the {len(weights)} products at {statistics.median(rates):.3f}x the rate of its own "
              f"{args.bound_mib} MiB product (paired; {k * k * 4 / statistics.median(t_big) / 1e9:.1f} GB/s there)")  # fmt: skip
        hand.close()
        big.close()


if __name__ == "__main__":
    main()
