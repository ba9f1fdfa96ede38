"""fuse-skip-layer-norm and fuse-skip-rms-norm: a residual Add and the LayerNormalization (or RMSNormalization) that
reads it, 2-D or 3-D, perturbed."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from onnx import helper

from fuzz.builder import F32, Builder, Case, binary, chance, perturbation, to_custom_domain


@st.composite
def skip_layer_norm_cases(draw: Any, rms: bool = False) -> Case:
    """A residual Add and the LayerNormalization (``rms``: RMSNormalization, opset 23) that reads it, 2-D or 3-D,
    with near misses."""
    from passes import FuseSkipLayerNorm, FuseSkipRmsNorm

    b = Builder(23 if rms else draw(st.sampled_from([17, 18])), const_nodes=draw(st.booleans()))
    b.value_info = draw(st.booleans())
    shape = draw(st.sampled_from([[2, 4], [1, 4], [1, 3, 4], [2, 2, 6]]))
    hidden = shape[-1]
    bad = perturbation(draw, ["broadcast", "axis", "mul", "rank4"] + ([] if rms else ["mean_out"]))  # RMS: one output
    if bad == "rank4":
        shape = [1, *shape] if len(shape) == 3 else [1, 1, *shape]
    tags = [f"shape={shape}", f"bad={bad}"]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = b.input("x", F32, shape)
    h = b.input("h", F32, [hidden] if bad == "broadcast" else shape)
    first = len(b.nodes)
    s = binary(b, draw, "Mul" if bad == "mul" else "Add", x, h)
    axis = -2 if bad == "axis" else draw(st.sampled_from([-1, len(shape) - 1]))
    norm_shape = shape[-2:] if bad == "axis" else [hidden]
    ins = [s, b.const((rng.standard_normal(norm_shape) + 1).astype(np.float32), np.float32)]
    if not rms and draw(st.booleans()):  # beta: LayerNormalization's only
        ins.append(b.const(rng.standard_normal(norm_shape).astype(np.float32), np.float32))
    outs = [b.fresh(), b.fresh()] if bad == "mean_out" else [b.fresh()]
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    b.nodes.append(helper.make_node("RMSNormalization" if rms else "LayerNormalization", ins, outs, name=b.fresh("n"), axis=axis,
                                    epsilon=eps))  # fmt: skip
    y = outs[0]
    if bad == "mean_out":
        b.output(outs[1], F32, [*shape[:-1], 1])
    reuse = draw(st.sampled_from(["none", "residual", "output"]))
    tags.append(f"sum={reuse}")
    if reuse == "residual":  # the sum is also the next residual, as in a pre-norm transformer
        y = b.op("Add", [y, s])
    elif reuse == "output":
        b.output(s, F32, shape)
    b.output(y, F32, shape)
    custom = to_custom_domain(draw, b, first, y, tags) if chance(draw, 1) else None
    name, make = ("fuse-skip-rms-norm", FuseSkipRmsNorm) if rms else ("fuse-skip-layer-norm", FuseSkipLayerNorm)
    return Case(name, b.model(), make, tuple(tags), atol=1e-4, rtol=1e-3, custom_node=custom)
