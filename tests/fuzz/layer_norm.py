"""fuse-layer-norm: decomposed LayerNorms in the spellings the pass accepts, perturbed."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from fuzz.builder import DTYPE_NAMES, F16, F32, F64, Builder, Case, chance, float_input, perturbation, to_custom_domain
from fuzz.norm_core import NORM_PERTURBATIONS, norm_tail, rsqrt_core


@st.composite
def layer_norm_cases(draw: Any) -> Case:
    """Decomposed LayerNorm: ReduceMean, Sub, Pow/Mul, ReduceMean, Add(eps), Sqrt, Div/Reciprocal, gamma, beta."""
    from passes import FuseLayerNorm

    opset = draw(st.sampled_from([12, 13, 14, 17, 18]))
    dtype = draw(st.sampled_from([F32, F32, F16, F64]))
    stats_fp32 = dtype == F16 and draw(st.booleans())
    tags = [f"opset={opset}", f"dtype={DTYPE_NAMES[dtype]}"] + (["stats_fp32"] if stats_fp32 else [])
    tags.append(perturbation(draw, NORM_PERTURBATIONS + ["mean_of_other", "sub_swapped", "custom_domain_node"]))
    b = Builder(opset, const_nodes=draw(st.booleans()))
    x, shape, width = float_input(draw, b, dtype)
    rank = len(shape)
    first = len(b.nodes)

    def pattern(root: str, p: list[str]) -> tuple[str, dict[str, str]]:
        axes = [draw(st.sampled_from([-1, rank - 1]))] if "axes_not_last" not in p else [0]
        xs = b.op("Cast", [root], to=F32) if stats_fp32 else root
        mean_src = b.op("Neg", [xs]) if "mean_of_other" in p else xs
        mean = b.reduce_mean(mean_src, axes)
        if stats_fp32:
            mean = b.op("Cast", [mean], to=F16)
        d = b.op("Sub", [mean, root] if "sub_swapped" in p else [root, mean])
        num = root if "numerator_other" in p else d
        n, inter = rsqrt_core(draw, b, num, d, axes, F32 if stats_fp32 else dtype, (F32, F16) if stats_fp32 else None, p, dtype == F16)
        inter.update(mean=mean, d=d)
        return norm_tail(draw, b, n, width, rank, dtype, True, p), inter

    y, inter = pattern(b.op("Relu", [x]) if draw(st.booleans()) else x, tags)
    custom = to_custom_domain(draw, b, first, y, tags) if "custom_domain_node" in tags else None
    if chance(draw, 3):  # a second LayerNorm on the first one's output
        tags.append("chained")
        y, _ = pattern(y, [])
    b.output(y, dtype, shape if custom else None)
    if "extra_consumer" in tags:
        pick = draw(st.sampled_from(sorted(inter)))
        tags.append(f"extra={pick}")
        b.output(
            b.op("Identity", [inter[pick]]) if draw(st.booleans()) else inter[pick],
            F32 if stats_fp32 and pick in ("var", "ve", "s") else dtype,
        )
    fp16 = dtype == F16
    return Case("fuse-layer-norm", b.model(), FuseLayerNorm, tuple(tags), atol=3e-2 if fp16 else 1e-4, rtol=3e-2 if fp16 else 1e-3,
                custom_node=custom)  # fmt: skip
