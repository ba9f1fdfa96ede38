"""clip-fp16: attention-style masks of float32 minima added before a Softmax."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzz.builder import F16, F32, NP, Builder, Case, binary, chance


@st.composite
def clip_fp16_cases(draw: Any) -> Case:
    """An attention-style mask of float32 minima (-3.4e38 and friends) added before a Softmax."""
    from passes import ClipFp16

    opset = draw(st.sampled_from([13, 17]))
    dtype = F16 if chance(draw, 2) else F32
    np_dt = NP[dtype]
    tags = [f"dtype={'fp16' if dtype == F16 else 'fp32'}"]
    b = Builder(opset, const_nodes=draw(st.booleans()))
    s = draw(st.integers(1, 5))
    x = b.input("x", dtype, ["batch", s, s])
    big = float(draw(st.sampled_from([np.finfo(np.float32).min, -1e30, -1e10, -7e4, -65504.0, -1e4, -np.inf])))
    if dtype == F16:
        big = max(big, -65504.0) if np.isfinite(big) else big
    tags.append(f"mask={big:g}")
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    keep = rng.random((s, s)) < 0.5
    np.fill_diagonal(keep, True)  # every query sees at least itself
    mask = np.where(keep, 0.0, big).astype(np_dt)
    scale = b.const(draw(st.sampled_from([0.125, 1.0, 2.0])), np_dt)
    scores = binary(b, draw, "Mul", x, scale)
    if draw(st.booleans()):
        tags.append("where")
        masked = b.op("Where", [b.const(keep, np.bool_), scores, b.const(big, np_dt)])
    else:
        masked = binary(b, draw, "Add", scores, b.const(mask, np_dt))
    b.output(b.op("Softmax", [masked], axis=-1), dtype)
    return Case("clip-fp16", b.model(), ClipFp16, tuple(tags), atol=2e-3 if dtype == F16 else 1e-6)
