"""The floors on the time per token: the memory-bandwidth bound (the best rate of one large product) and the kernel
ceiling (the decode graph's weight products alone, :func:`write_products_only`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qgraph.errors import QGraphError


def bound_product(mib: int = 512) -> tuple[Any, dict[str, np.ndarray]]:
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

    ``product``: a (model, feeds) of :func:`bound_product` to reuse instead of building one of ``mib`` MiB."""
    import onnxruntime as ort

    model, feeds = product or bound_product(mib)
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


@dataclass(frozen=True)
class WeightProduct:
    """A product of a graph with a 2-D fp32 weight: ``[1, k] x [k, n]``; ``trans_b``: a Gemm reading the weight as
    [n, k]; ``fed``: a graph input the runtime binds (the cpu target's large MatMul weights), not an initializer."""

    k: int
    n: int
    trans_b: bool
    fed: bool
    #: the vocabulary projection: its output is a graph output (the logits), directly or through a Reshape.
    vocab: bool = False


def weight_products(model: Any) -> list[WeightProduct]:
    """Every MatMul/Gemm of ``model`` (an onnx ModelProto) whose second input is a 2-D fp32 initializer or graph
    input, in graph order: the weights a decode step streams."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    fed_dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
                if i.type.tensor_type.elem_type == TensorProto.FLOAT and len(i.type.tensor_type.shape.dim) == 2}  # fmt: skip
    outputs = {o.name for o in model.graph.output}
    outputs |= {n.input[0] for n in model.graph.node if n.op_type == "Reshape" and n.output[0] in outputs}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        w = inits.get(n.input[1])
        dims = list(w.dims) if w is not None and w.data_type == TensorProto.FLOAT else fed_dims.get(n.input[1])
        if dims is None or len(dims) != 2 or not all(d > 0 for d in dims):
            continue
        trans_b = bool(next((a.i for a in n.attribute if a.name == "transB"), 0)) if n.op_type == "Gemm" else False
        k, n_out = (int(dims[1]), int(dims[0])) if trans_b else (int(dims[0]), int(dims[1]))
        out.append(WeightProduct(k, n_out, trans_b, w is None, n.output[0] in outputs))
    return out


def quantized_bytes(products: list[WeightProduct], bits: int, block_size: int) -> int:
    """Bytes the ``products``' weights take as symmetric blockwise ``bits``-bit integers with an fp32 scale per block
    of ``block_size`` along k (MatMulNBits' layout: each column's blocks padded to whole bytes)."""
    total = 0
    for p in products:
        blocks = -(-p.k // block_size)
        total += p.n * blocks * (-(-block_size * bits // 8) + 4)
    return total


def quantized_step_bytes(products: list[WeightProduct], weight_bytes: int, bits: int, block_size: int, vocab_bits: int,
                         rescored: bool) -> int:  # fmt: skip
    """Bytes a quantized decode step reads: ``weight_bytes`` with every weight product in ``bits``-bit blocks, the
    vocabulary projection in ``vocab_bits``; a ``rescored`` vocabulary's candidates read quantize-weights' coarser
    blocks (its int8 rows, a few per token, are left out); everything else (norms, biases) as before."""
    from passes.quantize_weights import candidate_block_size

    total = weight_bytes - sum(p.k * p.n * 4 for p in products)
    for p in products:
        if p.vocab:
            total += quantized_bytes([p], vocab_bits, candidate_block_size(p.k, block_size) if rescored else block_size)
        else:
            total += quantized_bytes([p], bits, block_size)
    return total


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
    fed_feeds: dict[str, np.ndarray] = {}
    out_path = Path(out_path)
    data_name = out_path.name + ".data"
    rng = np.random.default_rng(seed)
    nodes, inputs, outputs, weights, seen_k = [], [], [], [], set()
    offset = nbytes = 0
    with open(out_path.parent / data_name, "wb") as data:
        for p in weight_products(model):
            k, n_out, trans_b = p.k, p.n, p.trans_b
            dims = [n_out, k] if trans_b else [k, n_out]
            i = len(nodes)
            if k not in seen_k:
                seen_k.add(k)
                inputs.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]))
            values = rng.uniform(-0.05, 0.05, size=tuple(dims)).astype(np.float32)
            if p.fed:  # bound by the runtime: a graph input here too
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
