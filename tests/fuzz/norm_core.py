"""The parts both norm strategies draw: the rsqrt core ``num / sqrt(mean(sq^2) + eps)`` and the gamma/beta tail."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzz.builder import HIGH_RANK, NP, Builder, binary, vector

NORM_PERTURBATIONS = ["pow3", "mul_not_square", "eps_input", "neg_eps", "extra_consumer", "axes_not_last", "numerator_other",
                      "gamma_rank_too_high", "gamma_not_constant", "reduce_keepdims0", "eps_high_rank", "exponent_high_rank"]  # fmt: skip


def norm_tail(draw: Any, b: Builder, n: str, width: int | None, rank: int, dtype: int, with_beta: bool, tags: list[str]) -> str:
    """``n * gamma + beta`` in a random spelling (each optional)."""
    np_dt = NP[dtype]
    y = n
    kinds = ["none", "vector", "scalar", "leading_one", "one_plus"] if width else ["none", "scalar"]
    gamma_kind = draw(st.sampled_from(kinds))
    tags.append(f"gamma={gamma_kind}")
    if gamma_kind != "none":
        if "gamma_not_constant" in tags:
            gamma = b.input("g", dtype, [width] if width else [1])
        elif gamma_kind == "vector":
            gamma = b.const(vector(draw, width, np_dt, 0.5, 2.0), np_dt)  # type: ignore[arg-type]
        elif gamma_kind == "scalar":
            gamma = b.const(draw(st.sampled_from([0.5, 1.0, 2.0])), np_dt)
        elif gamma_kind == "one_plus":  # Gemma's RMSNorm scales by 1 + weight: a sum of two constants
            gamma = binary(b, draw, "Add", b.const(1.0, np_dt), b.const(vector(draw, width, np_dt, -0.5, 1.0), np_dt))  # type: ignore[arg-type]
        else:
            gamma = b.const(vector(draw, width, np_dt, 0.5, 2.0).reshape(1, width), np_dt)  # type: ignore[arg-type]
        if "gamma_rank_too_high" in tags:
            gamma = b.const(vector(draw, width or 1, np_dt).reshape((1,) * rank + (width or 1,)), np_dt)
        y = binary(b, draw, "Mul", y, gamma)
    if with_beta and draw(st.booleans()):
        tags.append("beta")
        beta = b.const(vector(draw, width, np_dt) if width and draw(st.booleans()) else draw(st.sampled_from([0.0, 0.5])), np_dt)
        y = binary(b, draw, "Add", y, beta)
    return y


def rsqrt_core(draw: Any, b: Builder, num: str, sq_src: str, axes: list[int], eps_dtype: int, stats_cast: tuple[int, int] | None,
                tags: list[str], fp16: bool) -> tuple[str, dict[str, str]]:  # fmt: skip
    """``num / sqrt(mean(sq_src^2) + eps)`` in a random spelling; returns the result and the intermediates."""
    p = tags
    inter: dict[str, str] = {}
    if "pow3" in p:
        sq = b.op("Pow", [sq_src, b.const(3.0, NP[eps_dtype] if stats_cast is None else np.float16)])
    elif "exponent_high_rank" in p:
        sq = b.op("Pow", [sq_src, b.const(np.full(HIGH_RANK, 2.0), NP[eps_dtype] if stats_cast is None else np.float16)])
    elif "mul_not_square" in p:
        sq = b.op("Mul", [sq_src, num if num != sq_src else b.op("Relu", [sq_src])])
    elif draw(st.booleans()):
        sq = b.op("Mul", [sq_src, sq_src])
    else:
        sq = b.op("Pow", [sq_src, b.const(2.0, NP[eps_dtype] if stats_cast is None else np.float16)])
    inter["sq"] = sq
    if stats_cast is not None:
        sq = b.op("Cast", [sq], to=stats_cast[0])
    var = b.reduce_mean(sq, axes, keepdims=0 if "reduce_keepdims0" in p else 1)
    if "reduce_keepdims0" in p:  # the same values, spelled ReduceMean(keepdims=0) + Unsqueeze
        var = b.unsqueeze(var, [-1])
    inter["var"] = var
    eps_value = draw(st.sampled_from([1e-5, 1e-6, 1e-3, 1e-2] if fp16 else [1e-12, 1e-6, 1e-5, 1e-3, 1e-1]))
    if "neg_eps" in p:
        eps_value = -1.0
    if "eps_high_rank" in p:
        eps_value = np.full(HIGH_RANK, eps_value)
    eps = b.input("eps", eps_dtype, []) if "eps_input" in p else b.const(eps_value, NP[eps_dtype])
    ve = binary(b, draw, "Add", var, eps)
    inter["ve"] = ve
    s = b.op("Sqrt", [ve])
    inter["s"] = s
    if stats_cast is not None:
        s = b.op("Cast", [s], to=stats_cast[1])
    form = draw(st.sampled_from(["div", "reciprocal", "div_one"]))
    tags.append(form)
    if form == "div":
        n = b.op("Div", [num, s])
    else:
        one = b.const(1.0, NP[stats_cast[1]] if stats_cast else NP[eps_dtype])
        r = b.op("Reciprocal", [s]) if form == "reciprocal" else b.op("Div", [one, s])
        inter["r"] = r
        n = binary(b, draw, "Mul", num, r)
    inter["n"] = n
    return n, inter
