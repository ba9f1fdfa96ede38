"""legalize-qnn-layout: attention-output merges [B, H, S, D] -> rows, at one token or more, square or not, read by a
MatMul, a Gemm-free Add or a graph output, with the Reshape's shape from a constant or a Constant node."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzz.builder import F32, Builder, Case, chance, perturbation, to_custom_domain


@st.composite
def legalize_qnn_layout_cases(draw: Any) -> Case:
    from passes import LegalizeQnnLayout

    b = Builder(draw(st.sampled_from([13, 17, 18])), const_nodes=draw(st.booleans()))
    bad = perturbation(draw, ["two_tokens", "not_square", "add_reader", "rows_2d", "batch_1"])
    heads = draw(st.integers(2, 4))
    batch = 1 if bad == "batch_1" else heads + 1 if bad == "not_square" else heads
    seq = 2 if bad == "two_tokens" else 1
    d = draw(st.sampled_from([2, 4]))
    tags = [f"B={batch} H={heads} S={seq} D={d}", f"bad={bad}"]
    x = b.input("x", F32, [batch, heads, seq, d])
    first = len(b.nodes)
    rows = [batch, heads * seq * d] if bad == "rows_2d" else [batch, seq, heads * d]
    merged = b.op("Reshape", [x, b.const(rows, np.int64)])
    n = draw(st.integers(1, 3))
    if bad == "add_reader":
        y = b.op("Add", [merged, merged])
        b.output(y, F32, rows)
    else:
        w = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal((rows[-1], n)).astype(np.float32)
        y = b.op("MatMul", [merged, b.const(w, np.float32)])
        b.output(y, F32, [*rows[:-1], n])
    custom = to_custom_domain(draw, b, first, y, tags) if chance(draw, 1) else None
    return Case("legalize-qnn-layout", b.model(), LegalizeQnnLayout, tuple(tags), custom_node=custom)
