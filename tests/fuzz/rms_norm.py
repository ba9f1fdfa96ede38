"""fuse-rms-norm: decomposed RMSNorms (LLaMA's float32 casts among them), perturbed."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from fuzz.builder import DTYPE_NAMES, F16, F32, F64, Builder, Case, float_input, perturbation, to_custom_domain
from fuzz.norm_core import NORM_PERTURBATIONS, norm_tail, rsqrt_core


@st.composite
def rms_norm_cases(draw: Any) -> Case:
    """Decomposed RMSNorm: Pow/Mul, ReduceMean, Add(eps), Sqrt, Div/Reciprocal, gamma; LLaMA's float32 casts."""
    from passes import FuseRmsNorm

    opset = draw(st.sampled_from([12, 13, 17, 18, 23]))
    dtype = draw(st.sampled_from([F32, F32, F16, F64]))
    llama = dtype == F16 and draw(st.booleans())
    tags = [f"opset={opset}", f"dtype={DTYPE_NAMES[dtype]}"] + (["llama_casts"] if llama else [])
    tags.append(perturbation(draw, NORM_PERTURBATIONS + ["centered", "custom_domain_node"]))
    b = Builder(opset, const_nodes=draw(st.booleans()))
    x, shape, width = float_input(draw, b, dtype)
    rank = len(shape)
    first = len(b.nodes)
    root = b.op("Relu", [x]) if draw(st.booleans()) else x
    xs = b.op("Cast", [root], to=F32) if llama else root
    if "centered" in tags:
        xs = b.op("Sub", [xs, b.reduce_mean(xs, [-1])])
    axes = [draw(st.sampled_from([-1, rank - 1]))] if "axes_not_last" not in tags else [0]
    num = b.op("Neg", [xs]) if "numerator_other" in tags else xs
    n, inter = rsqrt_core(draw, b, num, xs, axes, F32 if llama else dtype, None, tags, dtype == F16 and not llama)
    if llama:
        n = b.op("Cast", [n], to=F16)
    y = norm_tail(draw, b, n, width, rank, dtype, False, tags)
    custom = to_custom_domain(draw, b, first, y, tags) if "custom_domain_node" in tags else None
    b.output(y, dtype, shape if custom else None)
    if "extra_consumer" in tags:
        pick = draw(st.sampled_from(sorted(inter)))
        tags.append(f"extra={pick}")
        b.output(b.op("Identity", [inter[pick]]), F32 if llama else dtype)
    fp16 = dtype == F16
    return Case("fuse-rms-norm", b.model(), FuseRmsNorm, tuple(tags), atol=3e-2 if fp16 else 1e-4, rtol=3e-2 if fp16 else 1e-3,
                custom_node=custom)  # fmt: skip
