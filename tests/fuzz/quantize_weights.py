"""quantize-weights: linear layers (MatMul, Gemm in its attribute spellings, a transposed table), token embeddings, perturbed.

The rewritten graph computes with int8 (or int4) blocks and int8 activations, so it is compared with a tolerance
a few times the quantization error of these sizes (K <= 48, weights in [-1, 1], N(0, 1) inputs: outputs of about
+-4); a wrong layout, transpose or bias is off by whole units.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from onnx import helper

from fuzz.builder import F16, F32, I64, NP, Builder, Case, chance, perturbation

QUANT_PERTURBATIONS = ["weight_computed", "c_runtime_beta", "weight_input", "fp16", "transA", "weight_3d", "already_quantized"]
BLOCK = 16


def _weight(draw: Any, shape: tuple[int, ...]) -> np.ndarray:
    seed = draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@st.composite
def quantize_weights_cases(draw: Any) -> Case:
    """A linear layer (or a token embedding and its projection) with a constant weight, in int8 or int4 blocks."""
    from passes import QuantizeWeights

    opset = draw(st.sampled_from([13, 17, 18]))
    mode = draw(st.sampled_from(["int8", "int8", "int4"]))
    form = draw(st.sampled_from(["matmul", "gemm", "gemm", "embedding"]))
    bad = perturbation(draw, QUANT_PERTURBATIONS)
    if (bad == "weight_3d" and form == "gemm") or (bad in ("transA", "c_runtime_beta") and form != "gemm"):
        bad = "none"  # Gemm takes 2-D weights only; the Gemm attributes mean nothing elsewhere
    tags = [f"opset={opset}", mode, form, bad]
    dtype = F16 if bad == "fp16" else F32
    b = Builder(opset, const_nodes=draw(st.booleans()))
    k = draw(st.sampled_from([16, 24, 32, 48]))
    n = draw(st.integers(1, 8))
    m = draw(st.integers(1, 3))
    feeds = None

    def weight(shape: tuple[int, int]) -> str:
        w = _weight(draw, shape)
        if bad == "weight_input":
            return b.input("w", dtype, list(shape))
        if bad == "weight_3d":
            return b.const(w.reshape(1, *shape), NP[dtype])
        name = b.const(w, NP[dtype])
        return b.op("Relu", [name]) if bad == "weight_computed" else name

    if form == "embedding":
        vocab, seq = draw(st.integers(4, 12)), draw(st.integers(1, 4))
        ids = b.input("input_ids", I64, [1, seq])
        feeds = {"input_ids": np.random.default_rng(draw(st.integers(0, 99))).integers(0, vocab, (1, seq))}
        table = b.const(_weight(draw, (vocab, k)), NP[dtype])
        x = b.op("Gather", [table, ids])
        if chance(draw, 5):  # tied: the projection reads the table's transpose
            tags.append("tied")
            y = b.op("MatMul", [x, b.op("Transpose", [table], perm=[1, 0])])
        else:
            y = b.op("MatMul", [x, weight((k, vocab))])
        out_shape: list[int | str] = [1, seq, vocab]
    elif form == "matmul":
        lead = [m] if chance(draw, 5) else [draw(st.integers(1, 2)), m]
        x = b.input("x", dtype, [*lead, k])
        if chance(draw, 3) and bad not in ("weight_input", "weight_computed", "weight_3d"):
            tags.append("transposed_table")
            y = b.op("MatMul", [x, b.op("Transpose", [b.const(_weight(draw, (n, k)), NP[dtype])], perm=[1, 0])])
        else:
            y = b.op("MatMul", [x, weight((k, n))])
        out_shape = [*lead, n]
    else:
        trans_b = draw(st.booleans())
        attrs: dict[str, Any] = {"transB": 1} if trans_b else {}
        if bad == "transA":
            attrs["transA"] = 1
        if chance(draw, 3):
            attrs["alpha"] = draw(st.sampled_from([0.5, 2.0]))
        if chance(draw, 3) or bad == "c_runtime_beta":
            attrs["beta"] = draw(st.sampled_from([0.5, 2.0]))
        x = b.input("x", dtype, [k, m] if bad == "transA" else [m, k])
        inputs = [x, weight((n, k) if trans_b else (k, n))]
        c_form = (
            "runtime" if bad == "c_runtime_beta" else draw(st.sampled_from(["none", "row", "row2d", "full", "runtime", "column", "scalar"]))
        )
        tags.append(f"C={c_form}")
        if c_form == "runtime":
            inputs.append(b.input("c", dtype, [n]))
        elif c_form != "none":
            shape = {"row": (n,), "row2d": (1, n), "full": (m, n), "column": (m, 1), "scalar": (1,)}[c_form]
            inputs.append(b.const(_weight(draw, shape), NP[dtype]))
        y = b.op("Gemm", inputs, **attrs)
        out_shape = [m, n]
    if bad == "already_quantized":  # an earlier layer already in MatMulNBits
        b.domains["com.microsoft"] = 1
        packed = b.const(np.full((n, -(-n // BLOCK), BLOCK), 130, np.uint8), np.uint8, as_node=False)
        scales = b.const(np.full((n, -(-n // BLOCK)), 0.01, np.float32), np.float32, as_node=False)
        b.nodes.append(helper.make_node("MatMulNBits", [y, packed, scales], ["yq"], name=b.fresh("n"), domain="com.microsoft", K=n, N=n,
                                        bits=8, block_size=BLOCK))  # fmt: skip
        y = "yq"
    b.output(y, dtype, None if bad == "weight_3d" else out_shape)
    atol = 0.3 if mode == "int8" else 2.0
    return Case("quantize-weights", b.model(), lambda: QuantizeWeights(mode, BLOCK), tuple(tags), atol=atol, rtol=0.05, feeds=feeds)
