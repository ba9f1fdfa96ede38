"""fuse-gelu: decomposed GELUs, tanh or erf form, in the spellings the pass accepts, perturbed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzz.builder import F16, F32, HIGH_RANK, NP, Builder, Case, binary, chance, float_input, perturbation, to_custom_domain

GELU_PERTURBATIONS = ["half", "one", "k", "cubic", "exponent", "sqrt2", "extra_consumer", "other_x", "outer_other_x", "custom_domain_node",
                      "half_high_rank", "one_high_rank", "k_high_rank", "cubic_high_rank", "sqrt2_high_rank"]  # fmt: skip


@st.composite
def gelu_cases(draw: Any) -> Case:
    """Decomposed GELU, tanh or erf form, in the spellings fuse-gelu accepts (and others)."""
    from passes import FuseGelu

    opset = draw(st.sampled_from([12, 13, 17, 18, 20]))
    dtype = draw(st.sampled_from([F32, F32, F16]))
    np_dt = NP[dtype]
    form = draw(st.sampled_from(["tanh", "erf"]))
    tags = [f"opset={opset}", f"dtype={'fp16' if dtype == F16 else 'fp32'}", form]
    bad = perturbation(draw, GELU_PERTURBATIONS)
    tags.append(bad)
    b = Builder(opset, const_nodes=draw(st.booleans()))
    x_in, shape, _ = float_input(draw, b, dtype)
    first = len(b.nodes)

    def pattern(x: str, bad: str) -> tuple[str, dict[str, str]]:
        other = b.op("Neg", [x])
        inter: dict[str, str] = {}

        def c(value: float, name: str, wrong: float) -> str:
            if bad == f"{name}_high_rank":  # the right value, as a [1, 1, 1, 1] tensor
                return b.const(np.full(HIGH_RANK, value), np_dt)
            return b.const(wrong if bad == name else value, np_dt)

        if form == "tanh":
            cube_src = other if bad == "other_x" else x
            if bad == "exponent":
                cube = b.op("Pow", [cube_src, b.const(2.0, np_dt)])
            elif draw(st.booleans()):
                cube = b.op("Pow", [cube_src, b.const(3.0, np_dt)])
            else:
                sq = b.op("Mul", [cube_src, cube_src])
                cube = binary(b, draw, "Mul", sq, cube_src)
                inter["sq"] = sq
            inter["cube"] = cube
            if draw(st.booleans()):
                tags.append("k*(x+c*x^3)")
                inner = binary(b, draw, "Add", x, binary(b, draw, "Mul", cube, c(0.044715, "cubic", 0.05)))
                inter["inner"] = inner
                arg = binary(b, draw, "Mul", inner, c(math.sqrt(2 / math.pi), "k", 0.8))
            else:
                tags.append("k*x+kc*x^3")
                lin = binary(b, draw, "Mul", x, c(math.sqrt(2 / math.pi), "k", 0.8))
                inter["lin"] = lin
                arg = binary(b, draw, "Add", lin, binary(b, draw, "Mul", cube, c(math.sqrt(2 / math.pi) * 0.044715, "cubic", 0.04)))
            t = b.op("Tanh", [arg])
        else:
            src = other if bad == "other_x" else x
            if draw(st.booleans()):
                arg = b.op("Div", [src, c(math.sqrt(2), "sqrt2", 1.5)])
            else:
                arg = binary(b, draw, "Mul", src, c(1 / math.sqrt(2), "sqrt2", 0.6))
            t = b.op("Erf", [arg])
        inter["arg"], inter["t"] = arg, t
        outer_x = other if bad == "outer_other_x" else x
        spelling = draw(st.sampled_from(["half_x_first", "half_last", "half_with_one", "half_t_plus_half"]))
        tags.append(spelling)
        if spelling == "half_t_plus_half":
            ht = binary(b, draw, "Mul", t, c(0.5, "half", 0.4))
            u = binary(b, draw, "Add", ht, c(0.5, "one", 0.6))
            inter["u"] = u
            y = binary(b, draw, "Mul", outer_x, u)
        else:
            u = binary(b, draw, "Add", t, c(1.0, "one", 1.1))
            inter["u"] = u
            if spelling == "half_x_first":
                hx = binary(b, draw, "Mul", outer_x, c(0.5, "half", 0.4))
                y = binary(b, draw, "Mul", hx, u)
            elif spelling == "half_last":
                xu = binary(b, draw, "Mul", outer_x, u)
                inter["xu"] = xu
                y = binary(b, draw, "Mul", xu, c(0.5, "half", 0.4))
            else:
                hu = binary(b, draw, "Mul", u, c(0.5, "half", 0.4))
                inter["hu"] = hu
                y = binary(b, draw, "Mul", outer_x, hu)
        return y, inter

    y, inter = pattern(b.op("Relu", [x_in]) if draw(st.booleans()) else x_in, bad)
    custom = to_custom_domain(draw, b, first, y, tags) if bad == "custom_domain_node" else None
    if chance(draw, 3):  # a second GELU on the first one's output
        tags.append("chained")
        y, _ = pattern(y, "none")
    b.output(y, dtype, shape if custom else None)
    if bad == "extra_consumer":
        pick = draw(st.sampled_from(sorted(inter)))
        tags.append(f"extra={pick}")
        b.output(b.op("Identity", [inter[pick]]), dtype)
    fp16 = dtype == F16
    return Case("fuse-gelu", b.model(), FuseGelu, tuple(tags), atol=3e-2 if fp16 else 1e-4, rtol=3e-2 if fp16 else 1e-3,
                custom_node=custom)  # fmt: skip
