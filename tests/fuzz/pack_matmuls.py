"""pack-matmuls: linear layers reading one input (1 to 4 of them, widths and bias Adds drawn), perturbed.

Packing changes only the order of the sums' blocks, not their terms: the result is compared tightly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzz.builder import F16, F32, NP, Builder, Case, chance, perturbation

PACK_PERTURBATIONS = ["weight_input", "weight_computed", "weight_3d", "fp16", "other_input"]


@st.composite
def pack_matmuls_cases(draw: Any) -> Case:
    """Projections of one input by constant weights; a perturbation turns one of them into a product that is not one."""
    from passes import PackMatmuls

    opset = draw(st.sampled_from([13, 17, 18]))
    bad = perturbation(draw, PACK_PERTURBATIONS)
    count = draw(st.integers(1, 4))
    tags = [f"opset={opset}", f"matmuls={count}", bad]
    dtype = F16 if bad == "fp16" else F32
    b = Builder(opset, const_nodes=draw(st.booleans()))
    k = draw(st.integers(1, 24))
    lead = [draw(st.integers(1, 3))] if chance(draw, 5) else [draw(st.integers(1, 2)), draw(st.integers(1, 3))]
    x = b.input("x", dtype, [*lead, k])
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for i in range(count):
        n = draw(st.integers(1, 12))
        w = rng.uniform(-1, 1, (k, n)).astype(NP[dtype])
        last = i == count - 1
        if last and bad == "weight_input":
            weight = b.input("w", dtype, [k, n])
        elif last and bad == "weight_computed":
            weight = b.op("Relu", [b.const(w, NP[dtype])])
        elif last and bad == "weight_3d":
            weight = b.const(w.reshape(1, k, n), NP[dtype])
        else:
            weight = b.const(w, NP[dtype])
        source = b.input("x2", dtype, [*lead, k]) if last and bad == "other_input" else x
        y = b.op("MatMul", [source, weight])
        if chance(draw, 3):  # a bias after it (Qwen2's q/k/v)
            tags.append(f"bias{i}")
            y = b.op("Add", [y, b.const(rng.uniform(-1, 1, (n,)), NP[dtype])])
        b.output(y, dtype, None if last and bad == "weight_3d" else [*lead, n])
    return Case("pack-matmuls", b.model(), PackMatmuls, tuple(tags), atol=1e-4 if dtype == F32 else 1e-2, rtol=1e-4)
