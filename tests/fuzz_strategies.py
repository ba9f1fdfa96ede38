"""Hypothesis strategies: small random graphs holding each pass's target pattern, perturbed.

Each strategy draws a :class:`Case`: an ONNX model, the pass to run on it and
how to compare the result. The pattern comes in the spellings the pass
accepts (operand orders, Pow or Mul, Div or Reciprocal, Constant nodes or
initializers, float32 or float16, opsets old and new), and, with some
probability, perturbed: another constant (a wrong epsilon sign, 0.5 -> 0.4,
exponent 3), an extra consumer of an intermediate, a swapped Sub, another
tensor where the pattern needs the same one, another axis.

:func:`check` runs the pass on a case and returns what it did: ``"rewrite"``
(then the graph passed ``Graph.check`` (checker, strict shape inference) and
its outputs equal the original's on random inputs through onnxruntime),
``"decline"`` (then the graph is unchanged) or ``"refused"`` (the pass raised
a typed :class:`~qgraph.errors.QGraphError`, a clean refusal). Anything else
raises: that is a failure. ``tests/test_fuzz_passes.py`` runs a few dozen
examples per pass; ``tools/fuzz_passes.py`` runs long campaigns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from helpers import assert_same_outputs, run_shared_state, session
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qgraph.devtools.golden import canonical_text
from qgraph.errors import QGraphError
from qgraph.ir.graph import Graph
from qgraph.pipeline.manager import Pass

F32, F16, F64, I64, BOOL = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL
NP = {F32: np.float32, F16: np.float16, F64: np.float64, I64: np.int64, BOOL: np.bool_}
DTYPE_NAMES = {F32: "fp32", F16: "fp16", F64: "fp64"}


@dataclass
class Case:
    """One fuzz example: a model, the pass to run, and how to compare."""

    pass_name: str
    model: onnx.ModelProto
    make_pass: Callable[[], Pass]
    tags: tuple[str, ...] = ()
    atol: float = 1e-4
    rtol: float = 1e-3
    dims: dict[str, int] | None = None  # sizes of symbolic dims for the random inputs
    kv: dict[str, Any] | None = None  # retain-kv-cache: compare through a decode step
    feeds: dict[str, np.ndarray] | None = None  # inputs that must have these values (e.g. indices in range)
    custom_node: str | None = None  # a node moved to a custom domain: it must survive, and ORT cannot run the graph
    shared_state: bool = False  # run the rewritten graph with each cache updated in place (as the runtime binds it)
    idempotent: bool = True

    def __repr__(self) -> str:
        return f"Case({self.pass_name}, tags={list(self.tags)})\n{onnx.printer.to_text(self.model)}"


class Builder:
    """A small graph builder: names tensors t1, t2, ... and nodes n1, n2, ..."""

    def __init__(self, opset: int, const_nodes: bool = False) -> None:
        self.opset = opset
        self.const_nodes = const_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.domains: dict[str, int] = {}
        self.value_info = False  # keep the inferred shapes of intermediates (as exporters often do)
        self.k = 0

    def fresh(self, prefix: str = "t") -> str:
        self.k += 1
        return f"{prefix}{self.k}"

    def input(self, name: str, elem: int, shape: list[int | str] | None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, elem: int, shape: list[int | str | None] | None = None) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def const(self, value: Any, dtype: Any, as_node: bool | None = None) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.fresh("c")
        if self.const_nodes if as_node is None else as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("n"), value=numpy_helper.from_array(arr)))
        else:
            self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op: str, inputs: list[str], n_out: int = 1, out: str | None = None, **attrs: Any) -> str:
        outs = [out or self.fresh() for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh("n"), **attrs))
        return outs[0]

    def reduce_mean(self, x: str, axes: list[int], keepdims: int = 1) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.const(axes, np.int64)], keepdims=keepdims)
        return self.op("ReduceMean", [x], axes=axes, keepdims=keepdims)

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(axes, np.int64)])
        return self.op("Unsqueeze", [x], axes=axes)

    def model(self) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "fuzz", self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        m = helper.make_model(g, opset_imports=opsets)
        m.ir_version = 10
        # The checker wants a shape on every graph output: take the inferred ones.
        full = onnx.shape_inference.infer_shapes(m)
        inferred = {o.name: o for o in full.graph.output}
        if self.value_info:
            m.graph.value_info.extend(full.graph.value_info)
        for o in m.graph.output:
            new = inferred.get(o.name)
            if not o.type.tensor_type.HasField("shape") and new is not None and new.type.tensor_type.HasField("shape"):
                o.type.CopyFrom(new.type)
        return m


def _chance(draw: Any, tenths: int) -> bool:
    """True with probability ``tenths``/10."""
    return bool(draw(st.integers(0, 9)) < tenths)


def _perturbation(draw: Any, options: list[str]) -> str:
    """ "none" (the plain pattern) or one of ``options``."""
    return str(draw(st.sampled_from(["none"] * max(3, len(options) // 2) + options)))


CUSTOM_DOMAIN = "com.example"


def _to_custom_domain(draw: Any, b: Builder, first: int, final: str, tags: list[str]) -> str:
    """Move one live node made since ``first`` (not a Constant) to a custom domain; returns its name."""
    used = {i for n in b.nodes for i in n.input} | {final}
    node = draw(st.sampled_from([n for n in b.nodes[first:] if n.op_type != "Constant" and n.output[0] in used]))
    node.domain = CUSTOM_DOMAIN
    b.domains[CUSTOM_DOMAIN] = 1
    tags.append(f"custom={node.op_type}")
    return str(node.name)


def _binary(b: Builder, draw: Any, op: str, a: str, c: str) -> str:
    """``op(a, c)`` with the operands in a random order (Add and Mul commute)."""
    return b.op(op, [a, c] if draw(st.booleans()) else [c, a])


def _float_input(draw: Any, b: Builder, dtype: int, width: int | None = None) -> tuple[str, list[int | str], int | None]:
    """A graph input ``x`` of rank 2 or 3 (maybe a symbolic batch or last dim): (name, shape, last dim if known).

    Also decides whether the model keeps the shapes of its intermediates.
    """
    b.value_info = draw(st.booleans())
    rank = draw(st.integers(2, 3))
    width = width if width is not None else draw(st.integers(1, 8))
    shape: list[int | str] = [draw(st.integers(1, 3)) for _ in range(rank - 1)] + [width]
    if _chance(draw, 3):
        shape[0] = "batch"
    last: int | None = width
    if _chance(draw, 1):
        shape[-1] = "width"
        last = None
    x = b.input("x", dtype, shape)
    return x, shape, last


def _vector(draw: Any, width: int, dtype: Any, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    seed = draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).uniform(low, high, width).astype(dtype)


# --------------------------------------------------------------------------- norms


NORM_PERTURBATIONS = ["pow3", "mul_not_square", "eps_input", "neg_eps", "extra_consumer", "axes_not_last", "numerator_other",
                      "gamma_rank_too_high", "gamma_not_constant", "reduce_keepdims0", "eps_high_rank", "exponent_high_rank"]  # fmt: skip
#: A one-element constant of this shape broadcasts any rank-2 or rank-3 tensor to rank 4.
HIGH_RANK = (1, 1, 1, 1)


def _norm_tail(draw: Any, b: Builder, n: str, width: int | None, rank: int, dtype: int, with_beta: bool, tags: list[str]) -> str:
    """``n * gamma + beta`` in a random spelling (each optional)."""
    np_dt = NP[dtype]
    y = n
    gamma_kind = draw(st.sampled_from(["none", "vector", "scalar", "leading_one"])) if width else draw(st.sampled_from(["none", "scalar"]))
    tags.append(f"gamma={gamma_kind}")
    if gamma_kind != "none":
        if "gamma_not_constant" in tags:
            gamma = b.input("g", dtype, [width] if width else [1])
        elif gamma_kind == "vector":
            gamma = b.const(_vector(draw, width, np_dt, 0.5, 2.0), np_dt)  # type: ignore[arg-type]
        elif gamma_kind == "scalar":
            gamma = b.const(draw(st.sampled_from([0.5, 1.0, 2.0])), np_dt)
        else:
            gamma = b.const(_vector(draw, width, np_dt, 0.5, 2.0).reshape(1, width), np_dt)  # type: ignore[arg-type]
        if "gamma_rank_too_high" in tags:
            gamma = b.const(_vector(draw, width or 1, np_dt).reshape((1,) * rank + (width or 1,)), np_dt)
        y = _binary(b, draw, "Mul", y, gamma)
    if with_beta and draw(st.booleans()):
        tags.append("beta")
        beta = b.const(_vector(draw, width, np_dt) if width and draw(st.booleans()) else draw(st.sampled_from([0.0, 0.5])), np_dt)
        y = _binary(b, draw, "Add", y, beta)
    return y


def _rsqrt_core(draw: Any, b: Builder, num: str, sq_src: str, axes: list[int], eps_dtype: int, stats_cast: tuple[int, int] | None,
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
    ve = _binary(b, draw, "Add", var, eps)
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
        n = _binary(b, draw, "Mul", num, r)
    inter["n"] = n
    return n, inter


@st.composite
def layer_norm_cases(draw: Any) -> Case:
    """Decomposed LayerNorm: ReduceMean, Sub, Pow/Mul, ReduceMean, Add(eps), Sqrt, Div/Reciprocal, gamma, beta."""
    from passes import FuseLayerNorm

    opset = draw(st.sampled_from([12, 13, 14, 17, 18]))
    dtype = draw(st.sampled_from([F32, F32, F16, F64]))
    stats_fp32 = dtype == F16 and draw(st.booleans())
    tags = [f"opset={opset}", f"dtype={DTYPE_NAMES[dtype]}"] + (["stats_fp32"] if stats_fp32 else [])
    tags.append(_perturbation(draw, NORM_PERTURBATIONS + ["mean_of_other", "sub_swapped", "custom_domain_node"]))
    b = Builder(opset, const_nodes=draw(st.booleans()))
    x, shape, width = _float_input(draw, b, dtype)
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
        n, inter = _rsqrt_core(draw, b, num, d, axes, F32 if stats_fp32 else dtype, (F32, F16) if stats_fp32 else None, p, dtype == F16)
        inter.update(mean=mean, d=d)
        return _norm_tail(draw, b, n, width, rank, dtype, True, p), inter

    y, inter = pattern(b.op("Relu", [x]) if draw(st.booleans()) else x, tags)
    custom = _to_custom_domain(draw, b, first, y, tags) if "custom_domain_node" in tags else None
    if _chance(draw, 3):  # a second LayerNorm on the first one's output
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


@st.composite
def rms_norm_cases(draw: Any) -> Case:
    """Decomposed RMSNorm: Pow/Mul, ReduceMean, Add(eps), Sqrt, Div/Reciprocal, gamma; LLaMA's float32 casts."""
    from passes import FuseRmsNorm

    opset = draw(st.sampled_from([12, 13, 17, 18, 23]))
    dtype = draw(st.sampled_from([F32, F32, F16, F64]))
    llama = dtype == F16 and draw(st.booleans())
    tags = [f"opset={opset}", f"dtype={DTYPE_NAMES[dtype]}"] + (["llama_casts"] if llama else [])
    tags.append(_perturbation(draw, NORM_PERTURBATIONS + ["centered", "custom_domain_node"]))
    b = Builder(opset, const_nodes=draw(st.booleans()))
    x, shape, width = _float_input(draw, b, dtype)
    rank = len(shape)
    first = len(b.nodes)
    root = b.op("Relu", [x]) if draw(st.booleans()) else x
    xs = b.op("Cast", [root], to=F32) if llama else root
    if "centered" in tags:
        xs = b.op("Sub", [xs, b.reduce_mean(xs, [-1])])
    axes = [draw(st.sampled_from([-1, rank - 1]))] if "axes_not_last" not in tags else [0]
    num = b.op("Neg", [xs]) if "numerator_other" in tags else xs
    n, inter = _rsqrt_core(draw, b, num, xs, axes, F32 if llama else dtype, None, tags, dtype == F16 and not llama)
    if llama:
        n = b.op("Cast", [n], to=F16)
    y = _norm_tail(draw, b, n, width, rank, dtype, False, tags)
    custom = _to_custom_domain(draw, b, first, y, tags) if "custom_domain_node" in tags else None
    b.output(y, dtype, shape if custom else None)
    if "extra_consumer" in tags:
        pick = draw(st.sampled_from(sorted(inter)))
        tags.append(f"extra={pick}")
        b.output(b.op("Identity", [inter[pick]]), F32 if llama else dtype)
    fp16 = dtype == F16
    return Case("fuse-rms-norm", b.model(), FuseRmsNorm, tuple(tags), atol=3e-2 if fp16 else 1e-4, rtol=3e-2 if fp16 else 1e-3,
                custom_node=custom)  # fmt: skip


# --------------------------------------------------------------------------- GELU


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
    bad = _perturbation(draw, GELU_PERTURBATIONS)
    tags.append(bad)
    b = Builder(opset, const_nodes=draw(st.booleans()))
    x_in, shape, _ = _float_input(draw, b, dtype)
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
                cube = _binary(b, draw, "Mul", sq, cube_src)
                inter["sq"] = sq
            inter["cube"] = cube
            if draw(st.booleans()):
                tags.append("k*(x+c*x^3)")
                inner = _binary(b, draw, "Add", x, _binary(b, draw, "Mul", cube, c(0.044715, "cubic", 0.05)))
                inter["inner"] = inner
                arg = _binary(b, draw, "Mul", inner, c(math.sqrt(2 / math.pi), "k", 0.8))
            else:
                tags.append("k*x+kc*x^3")
                lin = _binary(b, draw, "Mul", x, c(math.sqrt(2 / math.pi), "k", 0.8))
                inter["lin"] = lin
                arg = _binary(b, draw, "Add", lin, _binary(b, draw, "Mul", cube, c(math.sqrt(2 / math.pi) * 0.044715, "cubic", 0.04)))
            t = b.op("Tanh", [arg])
        else:
            src = other if bad == "other_x" else x
            if draw(st.booleans()):
                arg = b.op("Div", [src, c(math.sqrt(2), "sqrt2", 1.5)])
            else:
                arg = _binary(b, draw, "Mul", src, c(1 / math.sqrt(2), "sqrt2", 0.6))
            t = b.op("Erf", [arg])
        inter["arg"], inter["t"] = arg, t
        outer_x = other if bad == "outer_other_x" else x
        spelling = draw(st.sampled_from(["half_x_first", "half_last", "half_with_one", "half_t_plus_half"]))
        tags.append(spelling)
        if spelling == "half_t_plus_half":
            ht = _binary(b, draw, "Mul", t, c(0.5, "half", 0.4))
            u = _binary(b, draw, "Add", ht, c(0.5, "one", 0.6))
            inter["u"] = u
            y = _binary(b, draw, "Mul", outer_x, u)
        else:
            u = _binary(b, draw, "Add", t, c(1.0, "one", 1.1))
            inter["u"] = u
            if spelling == "half_x_first":
                hx = _binary(b, draw, "Mul", outer_x, c(0.5, "half", 0.4))
                y = _binary(b, draw, "Mul", hx, u)
            elif spelling == "half_last":
                xu = _binary(b, draw, "Mul", outer_x, u)
                inter["xu"] = xu
                y = _binary(b, draw, "Mul", xu, c(0.5, "half", 0.4))
            else:
                hu = _binary(b, draw, "Mul", u, c(0.5, "half", 0.4))
                inter["hu"] = hu
                y = _binary(b, draw, "Mul", outer_x, hu)
        return y, inter

    y, inter = pattern(b.op("Relu", [x_in]) if draw(st.booleans()) else x_in, bad)
    custom = _to_custom_domain(draw, b, first, y, tags) if bad == "custom_domain_node" else None
    if _chance(draw, 3):  # a second GELU on the first one's output
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


# --------------------------------------------------------------------------- shape math (fold-constants, pin-static-shapes)


def _shape_gadgets(draw: Any, b: Builder, x: str, shape: list[int | str], mask: str | None, tags: list[str]) -> None:
    """One to three pieces of exporter-style shape arithmetic on ``x`` [d0, d1, W] (and ``mask``), each an output."""
    W = int(shape[-1])  # noqa: N806
    zero, one = b.const([0], np.int64), b.const([1], np.int64)
    full = b.op("Shape", [x])
    for _ in range(draw(st.integers(1, 3))):
        gadget = draw(st.sampled_from(["flatten", "merge_leading", "reshape_minus_one", "size", "gather_scalar_arith",
                                       "slice_shape", "mask_len", "expand", "const_of_shape", "range"]))  # fmt: skip
        tags.append(gadget)
        if gadget == "flatten":  # [d0, d1*W] from Shape(start=1) and ReduceProd
            inner = b.op("Shape", [x], start=1) if b.opset >= 15 else b.op("Slice", [full, one, b.const([3], np.int64)])
            flat = b.op("ReduceProd", [inner], keepdims=1) if b.opset < 18 else b.op("ReduceProd", [inner, zero], keepdims=1)
            target = b.op("Concat", [b.op("Gather", [full, zero], axis=0), flat], axis=0)
            b.output(b.op("Reshape", [x, target]), F32, [None, None])
        elif gadget == "merge_leading":  # [d0*d1, W]
            d0, d1 = b.op("Gather", [full, zero], axis=0), b.op("Gather", [full, one], axis=0)
            target = b.op("Concat", [_binary(b, draw, "Mul", d0, d1), b.const([W], np.int64)], axis=0)
            b.output(b.op("Reshape", [x, target]), F32, [None, W])
        elif gadget == "reshape_minus_one":
            b.output(b.op("Reshape", [x, b.const([-1, W], np.int64)]), F32, [None, W])
        elif gadget == "size":
            sz = b.op("Cast", [b.op("Size", [x])], to=F32)
            b.output(_binary(b, draw, "Add", x, sz), F32)
        elif gadget == "gather_scalar_arith":  # x + float(d1 * 2 - 1)
            d1 = b.op("Gather", [full, b.const(1, np.int64)], axis=0)
            v = b.op("Sub", [_binary(b, draw, "Mul", d1, b.const(2, np.int64)), b.const(1, np.int64)])
            b.output(_binary(b, draw, "Add", x, b.op("Cast", [v], to=F32)), F32)
        elif gadget == "slice_shape":  # Reshape(x, Concat(Slice(shape, 0, 2), [W]))
            lead = b.op("Slice", [full, zero, b.const([2], np.int64)])
            b.output(b.op("Reshape", [x, b.op("Concat", [lead, b.const([W], np.int64)], axis=0)]), F32, [None, None, W])
        elif gadget == "mask_len" and mask is not None:  # x + float(total_len - seq_len)
            t = b.op("Gather", [b.op("Shape", [mask]), one], axis=0)
            s = b.op("Gather", [full, one], axis=0)
            b.output(_binary(b, draw, "Add", x, b.op("Cast", [b.op("Sub", [t, s])], to=F32)), F32)
        elif gadget == "expand":  # Expand a constant row to x's shape
            row = b.const(_vector(draw, W, np.float32), np.float32)
            b.output(_binary(b, draw, "Mul", x, b.op("Expand", [row, full])), F32)
        elif gadget == "const_of_shape":
            fill = b.op("ConstantOfShape", [full], value=numpy_helper.from_array(np.array([0.5], np.float32)))
            b.output(_binary(b, draw, "Add", x, fill), F32)
        elif gadget == "range":  # x + Range(0, W, 1) as float
            r = b.op("Range", [b.const(0, np.int64), b.op("Squeeze", [b.op("Gather", [full, b.const([2], np.int64)], axis=0), zero]),
                               b.const(1, np.int64)])  # fmt: skip
            b.output(_binary(b, draw, "Add", x, b.op("Cast", [r], to=F32)), F32)
        else:
            b.output(b.op("Identity", [x]), F32)
    if _chance(draw, 2):
        tags.append("shape_is_output")
        b.output(full, I64)


def _const_arith(draw: Any, b: Builder, x: str, width: int, tags: list[str]) -> None:
    """A chain of arithmetic on small constants (int64 and float32), then added to x."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    ints = [b.const(rng.integers(-5, 6, width), np.int64)]
    floats = [b.const(rng.uniform(-2, 2, width).astype(np.float32), np.float32)]
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["Add", "Sub", "Mul", "Div", "Neg", "Abs", "Cast_if", "Cast_fi", "Max", "Min", "Where", "Concat_Slice",
                                   "Unsqueeze_Squeeze", "Transpose"]))  # fmt: skip
        tags.append(op)
        a_i, a_f = draw(st.sampled_from(ints)), draw(st.sampled_from(floats))
        if op in ("Add", "Sub", "Mul", "Max", "Min"):
            if draw(st.booleans()):
                ints.append(b.op(op, [a_i, draw(st.sampled_from(ints))]))
            else:
                floats.append(b.op(op, [a_f, draw(st.sampled_from(floats))]))
        elif op == "Div":  # by a fresh constant that is never 0
            if draw(st.booleans()):
                ints.append(b.op("Div", [a_i, b.const(rng.choice([-3, -2, -1, 1, 2, 3], width), np.int64)]))
            else:
                floats.append(b.op("Div", [a_f, b.const(rng.choice([-2.0, -0.5, 0.5, 4.0], width).astype(np.float32), np.float32)]))
        elif op in ("Neg", "Abs"):
            floats.append(b.op(op, [a_f]))
        elif op == "Cast_if":
            floats.append(b.op("Cast", [a_i], to=F32))
        elif op == "Cast_fi":
            ints.append(b.op("Cast", [a_f], to=I64))
        elif op == "Where":
            floats.append(b.op("Where", [b.op("Less", [a_i, b.const(0, np.int64)]), a_f, draw(st.sampled_from(floats))]))
        elif op == "Concat_Slice":
            cat = b.op("Concat", [a_f, draw(st.sampled_from(floats))], axis=0)
            floats.append(b.op("Slice", [cat, b.const([1], np.int64), b.const([width + 1], np.int64)]))
        elif op == "Unsqueeze_Squeeze":
            floats.append(b.op("Squeeze", [b.unsqueeze(a_f, [0]), b.const([0], np.int64)] if b.opset >= 13 else [b.unsqueeze(a_f, [0])],
                               **({} if b.opset >= 13 else {"axes": [0]})))  # fmt: skip
        else:
            floats.append(b.op("Transpose", [b.unsqueeze(a_f, [1])], perm=[1, 0]))
            floats[-1] = b.op("Reshape", [floats[-1], b.const([width], np.int64)])
    total = b.op("Add", [b.op("Cast", [ints[-1]], to=F32), floats[-1]])
    b.output(_binary(b, draw, "Add", x, total), F32)


@st.composite
def fold_constants_cases(draw: Any) -> Case:
    """Constant-foldable shape math and constant arithmetic, around a dynamic input."""
    from passes import FoldConstants

    opset = draw(st.sampled_from([13, 14, 17, 18]))
    tags = [f"opset={opset}"]
    b = Builder(opset, const_nodes=draw(st.booleans()))
    width = draw(st.integers(1, 5))
    shape: list[int | str] = [draw(st.sampled_from([2, "batch"])), draw(st.sampled_from([3, "seq_len"])), width]
    x = b.input("x", F32, shape)
    mask = b.input("mask", I64, [shape[0], "total_len"]) if draw(st.booleans()) else None
    if draw(st.booleans()):
        _shape_gadgets(draw, b, x, shape, mask, tags)
    else:
        _const_arith(draw, b, x, width, tags)
    dims = {"batch": draw(st.integers(1, 3)), "seq_len": draw(st.integers(1, 4)), "total_len": draw(st.integers(1, 6))}
    return Case("fold-constants", b.model(), FoldConstants, tuple(tags), dims=dims, idempotent=False)


@st.composite
def pin_static_shapes_cases(draw: Any) -> Case:
    """Symbolic batch/seq_len (and total_len) pinned to sizes; the shape math must fold and agree."""
    from passes import PinStaticShapes

    opset = draw(st.sampled_from([13, 17, 18]))
    names = draw(st.sampled_from([("batch", "seq_len", "total_len"), ("batch_size", "sequence_length", "total_sequence_length")]))
    tags = [f"opset={opset}", f"names={names[0]}"]
    b = Builder(opset, const_nodes=draw(st.booleans()))
    width = draw(st.integers(1, 5))
    shape: list[int | str] = [names[0], names[1], width]
    if _chance(draw, 1):
        tags.append("unknown_dim_name")
        shape[1] = "mystery"
    x = b.input("x", F32, shape)
    mask = b.input("mask", I64, [names[0], names[2]]) if draw(st.booleans()) else None
    _shape_gadgets(draw, b, x, shape, mask, tags)
    if mask is not None:
        b.output(b.op("Cast", [mask], to=F32), F32)
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    ctx = seq + draw(st.integers(0, 3))
    dims = {names[0]: batch, names[1]: seq, names[2]: ctx, "mystery": seq}
    return Case("pin-static-shapes", b.model(), lambda: PinStaticShapes(batch, seq, ctx), tuple(tags), dims=dims, idempotent=False)


# --------------------------------------------------------------------------- clip-fp16


@st.composite
def clip_fp16_cases(draw: Any) -> Case:
    """An attention-style mask of float32 minima (-3.4e38 and friends) added before a Softmax."""
    from passes import ClipFp16

    opset = draw(st.sampled_from([13, 17]))
    dtype = F16 if _chance(draw, 2) else F32
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
    scores = _binary(b, draw, "Mul", x, scale)
    if draw(st.booleans()):
        tags.append("where")
        masked = b.op("Where", [b.const(keep, np.bool_), scores, b.const(big, np_dt)])
    else:
        masked = _binary(b, draw, "Add", scores, b.const(mask, np_dt))
    b.output(b.op("Softmax", [masked], axis=-1), dtype)
    return Case("clip-fp16", b.model(), ClipFp16, tuple(tags), atol=2e-3 if dtype == F16 else 1e-6)


# --------------------------------------------------------------------------- retain-kv-cache


@st.composite
def retain_kv_cache_cases(draw: Any) -> Case:
    """A toy GPT: embeddings, 1-2 attention layers with a concat-grown cache and an attention_mask input."""
    from passes import RetainKvCache

    opset = draw(st.sampled_from([13, 14, 17, 18]))
    heads, head_dim, vocab = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 6))
    layers = draw(st.integers(1, 2))
    hidden = heads * head_dim
    ctx = draw(st.integers(2, 8))
    scale_form = draw(st.sampled_from(["mul", "div", "none"]))
    mask_form = draw(st.sampled_from(["where", "additive"]))
    logits_form = draw(st.sampled_from(["matmul", "matmul_add"]))
    tags = [f"opset={opset}", f"heads={heads}", f"head_dim={head_dim}", f"layers={layers}", scale_form, mask_form, logits_form]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    b = Builder(opset, const_nodes=draw(st.booleans()))
    ids = b.input("input_ids", I64, ["batch", "seq_len"])
    am = b.input("attention_mask", I64, ["batch", "total_len"])
    pos = b.input("position_ids", I64, ["batch", "seq_len"])
    pasts = []
    for i in range(layers):
        pasts.append((b.input(f"past_key.{i}", F32, ["batch", heads, "past_len", head_dim]),
                      b.input(f"past_value.{i}", F32, ["batch", heads, "past_len", head_dim])))  # fmt: skip
    wte = b.const(rng.standard_normal((vocab, hidden)).astype(np.float32), np.float32, as_node=False)
    wpe = b.const(rng.standard_normal((ctx + 2, hidden)).astype(np.float32), np.float32, as_node=False)
    h = b.op("Add", [b.op("Gather", [wte, ids]), b.op("Gather", [wpe, pos])])
    presents = []
    split = b.const([0, 0, heads, head_dim], np.int64)
    for i in range(layers):

        def heads_of(t: str) -> str:
            return b.op("Transpose", [b.op("Reshape", [t, split])], perm=[0, 2, 1, 3])

        # Weights of scale 1/sqrt(hidden) keep activations O(1), as a trained model's are: the additive
        # mask (-10000) hides a slot only while scores stay far below 10000.
        wq, wk, wv = (b.const((rng.standard_normal((hidden, hidden)) / math.sqrt(hidden)).astype(np.float32), np.float32, as_node=False)
                      for _ in range(3))  # fmt: skip
        q, k, v = (heads_of(b.op("MatMul", [h, w])) for w in (wq, wk, wv))
        pk = b.op("Concat", [pasts[i][0], k], axis=-2, out=f"present_key.{i}")
        pv = b.op("Concat", [pasts[i][1], v], axis=-2, out=f"present_value.{i}")
        presents += [pk, pv]
        scores = b.op("MatMul", [q, b.op("Transpose", [pk], perm=[0, 1, 3, 2])])
        if scale_form == "mul":
            scores = _binary(b, draw, "Mul", scores, b.const(1 / math.sqrt(head_dim), np.float32))
        elif scale_form == "div":
            scores = b.op("Div", [scores, b.const(math.sqrt(head_dim), np.float32)])
        am4 = b.unsqueeze(am, [1, 2])
        if mask_form == "where":
            masked = b.op("Where", [b.op("Cast", [am4], to=BOOL), scores, b.const(-10000.0, np.float32)])
        else:
            bias = b.op("Mul", [b.op("Sub", [b.const(1.0, np.float32), b.op("Cast", [am4], to=F32)]), b.const(-10000.0, np.float32)])
            masked = _binary(b, draw, "Add", scores, bias)
        probs = b.op("Softmax", [masked], axis=-1)
        attn = b.op("MatMul", [probs, pv])
        merged = b.op("Reshape", [b.op("Transpose", [attn], perm=[0, 2, 1, 3]), b.const([0, 0, hidden], np.int64)])
        wo = b.const((rng.standard_normal((hidden, hidden)) / math.sqrt(hidden)).astype(np.float32), np.float32, as_node=False)
        h = b.op("Add", [h, b.op("MatMul", [merged, wo])])
    head = b.const(rng.standard_normal((hidden, vocab)).astype(np.float32), np.float32, as_node=False)
    if logits_form == "matmul":
        logits = b.op("MatMul", [h, head], out="logits")
    else:
        logits = b.op("Add", [b.op("MatMul", [h, head]), b.const(rng.standard_normal(vocab).astype(np.float32), np.float32)], out="logits")
    b.output(logits, F32, ["batch", "seq_len", vocab])
    for i in range(layers):
        for role in ("key", "value"):
            b.output(f"present_{role}.{i}", F32, ["batch", heads, "total_len", head_dim])
    past_len = draw(st.integers(0, ctx - 1))
    batch = draw(st.integers(1, 2))
    kv = {"ctx": ctx, "past_len": past_len, "batch": batch, "vocab": vocab, "heads": heads, "head_dim": head_dim, "layers": layers,
          "seed": draw(st.integers(0, 2**16))}  # fmt: skip
    tags += [f"ctx={ctx}", f"past_len={past_len}"]
    return Case("retain-kv-cache", b.model(), lambda: RetainKvCache(ctx_len=ctx), tuple(tags), kv=kv)


# --------------------------------------------------------------------------- legalize-qnn, cleanup


@st.composite
def legalize_qnn_cases(draw: Any) -> Case:
    """GatherND with constant or run-time indices, on bool, float or int data."""
    from passes import LegalizeQnn

    b = Builder(draw(st.sampled_from([13, 17, 18])), const_nodes=draw(st.booleans()))
    rank = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 3)) for _ in range(rank)]
    elem = draw(st.sampled_from([BOOL, F32, I64]))
    tags = [f"data={TensorProto.DataType.Name(elem).lower()}", f"shape={shape}"]
    x = b.input("x", elem, shape)
    data = b.op("Identity", [x]) if draw(st.booleans()) else x
    k = draw(st.integers(1, rank))
    lead = [draw(st.integers(1, 3)) for _ in range(draw(st.integers(0, 2)))]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    idx = np.stack([rng.integers(-d, d, lead) for d in shape[:k]], axis=-1).astype(np.int64)
    if draw(st.booleans()):
        tags.append("runtime_indices")
        indices = b.op("Identity", [b.input("i", I64, [*lead, k])])
    else:
        indices = b.const(idx, np.int64)
    first = len(b.nodes)
    y = b.op("GatherND", [data, indices])
    b.output(y, elem, [*lead, *shape[k:]])
    custom = _to_custom_domain(draw, b, first, y, tags) if _chance(draw, 1) else None
    return Case("legalize-qnn", b.model(), LegalizeQnn, tuple(tags), feeds={"i": idx}, idempotent=False, custom_node=custom)


@st.composite
def cleanup_cases(draw: Any) -> Case:
    """Any of the norm or GELU graphs, nodes shuffled, with dead nodes added."""
    from passes import Cleanup

    inner = draw(st.one_of(layer_norm_cases(), gelu_cases()))
    model = inner.model
    g = model.graph
    extra = [helper.make_node("Neg", [g.input[0].name], [f"dead{i}"], name=f"dead_node{i}") for i in range(draw(st.integers(0, 3)))]
    nodes = list(g.node) + extra
    order = draw(st.permutations(range(len(nodes))))
    del g.node[:]
    g.node.extend(nodes[i] for i in order)
    return Case("cleanup", model, Cleanup, ("shuffled", f"dead={len(extra)}", *inner.tags), atol=inner.atol, rtol=inner.rtol, idempotent=False,
                custom_node=inner.custom_node)  # fmt: skip


@st.composite
def attention_cases(draw: Any) -> Case:
    """Softmax(Q K^T * s + bias) V in the dynamo and TorchScript spellings, perturbed or not."""
    from passes import FuseAttention

    b = Builder(draw(st.sampled_from([14, 17, 18])), const_nodes=draw(st.booleans()))
    b.value_info = draw(st.booleans())
    bsz, heads, s_len, h = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    length = draw(st.integers(1, 4))
    bad = _perturbation(draw, ["softmax_axis", "key_perm", "bias_rows", "scale_tensor", "probs_output", "v_heads"])
    tags = [f"B={bsz} N={heads} S={s_len} L={length} H={h}", f"bad={bad}"]
    split_heads = draw(st.booleans())
    if split_heads:  # dynamo/HF: the query arrives as [B, S, N*H] and is split into heads
        q_in = b.input("q_in", F32, [bsz, s_len, heads * h])
        q = b.op("Transpose", [b.op("Reshape", [q_in, b.const([bsz, s_len, heads, h], np.int64)])], perm=[0, 2, 1, 3])
    else:
        q = b.input("q", F32, [bsz, heads, s_len, h])
    k = b.input("k", F32, [bsz, heads, length, h])
    v_heads = 2 if bad == "v_heads" and heads == 1 else heads  # V broadcasts over Q's single head
    v = b.input("v", F32, [bsz, v_heads, length, h])
    first = len(b.nodes)
    scale = float(draw(st.sampled_from([1.0, 0.5, 1 / np.sqrt(h)])))
    spelling = draw(st.sampled_from(["transpose", "dynamo"]))
    tags.append(spelling)
    if spelling == "dynamo":
        kt = b.op("Transpose", [b.op("Reshape", [k, b.const([bsz * heads, length, h], np.int64)])], perm=[0, 2, 1])
        kt = b.op("Reshape", [kt, b.const([bsz, heads, h, length], np.int64)])
        root = float(np.sqrt(scale))
        q = _binary(b, draw, "Mul", q, b.const(np.float32(root), np.float32))
        kt = _binary(b, draw, "Mul", kt, b.const(np.float32(root), np.float32))
        scores = b.op("MatMul", [q, kt])
    else:
        kt = b.op("Transpose", [k], perm=[1, 0, 3, 2] if bad == "key_perm" and bsz == heads else [0, 1, 3, 2])
        scores = b.op("MatMul", [q, kt])
        if bad == "scale_tensor":  # a per-position factor is not a scale
            scores = b.op("Mul", [scores, b.const(np.linspace(0.5, 1.0, length, dtype=np.float32), np.float32)])
        elif draw(st.booleans()):
            scores = b.op("Div", [scores, b.const(np.float32(1 / scale), np.float32)])
        else:
            scores = _binary(b, draw, "Mul", scores, b.const(np.float32(scale), np.float32))
    if draw(st.booleans()) or bad == "bias_rows":
        rows = 1 if bad == "bias_rows" else s_len
        lead = [draw(st.sampled_from([1, bsz])), draw(st.sampled_from([1, heads]))][draw(st.integers(0, 2)) :]
        bias = b.input("bias", F32, [*lead, rows, length])
        tags.append(f"bias={[*lead, rows, length]}")
        scores = _binary(b, draw, "Add", scores, bias)
    probs = b.op("Softmax", [scores], axis=2 if bad == "softmax_axis" else draw(st.sampled_from([-1, 3])))
    y = b.op("MatMul", [probs, v])
    out_heads = max(heads, v_heads)
    y_shape = [bsz, out_heads, s_len, h]
    if split_heads and draw(st.booleans()):  # merge the heads again, to 3-D or 2-D
        y_shape = [bsz, s_len, out_heads * h] if draw(st.booleans()) else [bsz * s_len, out_heads * h]
        y = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.const(y_shape, np.int64)])
    b.output(y, F32, y_shape)  # declared: a custom-domain node below hides it from inference
    if bad == "probs_output":
        b.output(probs, F32, [bsz, heads, s_len, length])
    custom = _to_custom_domain(draw, b, first, y, tags) if _chance(draw, 1) else None
    return Case("fuse-attention", b.model(), FuseAttention, tuple(tags), atol=1e-4, rtol=1e-3, custom_node=custom)


@st.composite
def simplify_shapes_cases(draw: Any) -> Case:
    """Chains of Reshape, Transpose, GatherElements, Expand and Identity on static shapes, some trivial, some not."""
    from passes import SimplifyShapes

    if draw(st.booleans()):
        return draw(row_region_cases())
    b = Builder(draw(st.sampled_from([13, 17, 18])), const_nodes=draw(st.booleans()))
    b.value_info = draw(st.booleans())
    rank = draw(st.integers(2, 4))
    shape = [draw(st.sampled_from([1, 1, 2, 3])) for _ in range(rank)]
    cur = b.input("x", F32, list(shape))
    tags = [f"shape={shape}"]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    first = len(b.nodes)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["Reshape", "Transpose", "GatherElements", "GatherLine", "Expand", "Identity", "Relu"]))
        tags.append(op)
        if op == "Reshape":
            new = list(draw(st.permutations(shape))) if draw(st.booleans()) else [*shape, 1] if len(shape) < 5 else shape
            cur = b.op("Reshape", [cur, b.const(new, np.int64)])
            shape = new
        elif op == "Transpose":
            perm = list(draw(st.permutations(range(len(shape)))))
            cur = b.op("Transpose", [cur], perm=perm)
            shape = [shape[p] for p in perm]
        elif op == "GatherElements":
            axis = draw(st.integers(-len(shape), len(shape) - 1))
            idx = rng.integers(-shape[axis], shape[axis], shape).astype(np.int64)  # valid indices, negative ones too
            cur = b.op("GatherElements", [cur, b.const(idx, np.int64)], axis=axis)
        elif op == "GatherLine":  # indices broadcast from a line along the axis (a Gather), or from more (not one)
            axis = draw(st.integers(-len(shape), len(shape) - 1))
            ax = axis % len(shape)
            n = draw(st.integers(1, 3))
            lshape = [1] * len(shape)
            lshape[ax] = n
            others = [j for j in range(len(shape)) if j != ax and shape[j] > 1]
            if others and _chance(draw, 3):
                j = draw(st.sampled_from(others))
                lshape[j] = shape[j]
                tags.append("not-a-line")
            line = rng.integers(-shape[ax], shape[ax], lshape).astype(np.int64)
            target = list(shape)
            target[ax] = n
            cur = b.op("GatherElements", [cur, b.op("Expand", [b.const(line, np.int64), b.const(target, np.int64)])], axis=axis)
            shape = target
        elif op == "Expand":
            target = [d if draw(st.booleans()) or d != 1 else 2 for d in shape]
            cur = b.op("Expand", [cur, b.const(target, np.int64)])
            shape = target
        else:
            cur = b.op(op, [cur])
    b.output(cur, F32, list(shape))
    custom = _to_custom_domain(draw, b, first, cur, tags) if _chance(draw, 1) else None
    return Case("simplify-shapes", b.model(), SimplifyShapes, tuple(tags), custom_node=custom)


@st.composite
def row_region_cases(draw: Any) -> Case:
    """Linear layers written as Reshape, Gemm/MatMul, Reshape, with row-wise and other ops between (simplify-shapes' 2-D regions)."""
    from passes import SimplifyShapes

    b = Builder(draw(st.sampled_from([17, 18])), const_nodes=draw(st.booleans()))
    b.value_info = draw(st.booleans())
    lead = draw(st.sampled_from([[1, 1], [2, 1], [1, 3], [2, 3], [1, 1, 2]]))
    rows = int(np.prod(lead))
    k = draw(st.sampled_from([2, 4, 6]))
    cur = b.input("x", F32, [*lead, k])
    tags = [f"lead={lead}"]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    seen = {k: [cur]}  # tensors of shape [*lead, k], by k: residual operands

    def weights(*shape: int) -> str:
        return b.const((rng.standard_normal(shape) * 0.5).astype(np.float32), np.float32)

    first = len(b.nodes)
    for _ in range(draw(st.integers(1, 7))):
        op = draw(st.sampled_from(["linear", "linear", "Relu", "LayerNormalization", "norm_axis1", "Mul", "Add", "split", "Softmax"]))
        tags.append(op)
        if op == "linear":
            n = draw(st.sampled_from([2, 4, 6]))
            flat = b.op("Reshape", [cur, b.const([rows, k], np.int64)])
            if draw(st.booleans()):
                y = b.op("Gemm", [flat, weights(k, n), weights(n)])
            else:
                y = b.op("MatMul", [flat, weights(k, n)])
            cur, k = b.op("Reshape", [y, b.const([*lead, n] if draw(st.booleans()) else [*lead[:-1], -1, n], np.int64)]), n
        elif op == "Relu":
            cur = b.op("Relu", [cur])
        elif op == "LayerNormalization":
            axis = draw(st.sampled_from([-1, len(lead)]))
            cur = b.op("LayerNormalization", [cur, weights(k), weights(k)], axis=axis)
        elif op == "norm_axis1":  # over the trailing axes from 1: not row-wise
            shape = [*lead, k][1:]
            cur = b.op("LayerNormalization", [cur, weights(*shape), weights(*shape)], axis=1)
        elif op == "Mul":  # a row-broadcast operand of rank 1, 2 or 3 (rank 3 keeps the leading axes)
            cur = _binary(b, draw, "Mul", cur, weights(*draw(st.sampled_from([[k], [1, k], [1, 1, k]]))))
        elif op == "Add":  # a residual of the same shape, or a row vector
            other = draw(st.sampled_from(seen.get(k, []) + [weights(k)]))
            cur = _binary(b, draw, "Add", cur, other)
        elif op == "split" and k % 2 == 0:
            h1, h2 = b.fresh(), b.fresh()
            axis = draw(st.sampled_from([-1, len(lead)]))
            b.nodes.append(helper.make_node("Split", [cur, b.const([k // 2, k // 2], np.int64)], [h1, h2], name=b.fresh("n"), axis=axis))
            cur, k = b.op("Mul", [h1, h2]), k // 2
        elif op == "Softmax":
            cur = b.op("Softmax", [cur], axis=-1)
        seen.setdefault(k, []).append(cur)
    b.output(cur, F32, [*lead, k])
    custom = _to_custom_domain(draw, b, first, cur, tags) if _chance(draw, 1) else None
    return Case("simplify-shapes", b.model(), SimplifyShapes, tuple(tags), atol=1e-4, rtol=1e-3, custom_node=custom)


@st.composite
def skip_layer_norm_cases(draw: Any) -> Case:
    """A residual Add and the LayerNormalization that reads it, 2-D or 3-D, with near misses."""
    from passes import FuseSkipLayerNorm

    b = Builder(draw(st.sampled_from([17, 18])), const_nodes=draw(st.booleans()))
    b.value_info = draw(st.booleans())
    shape = draw(st.sampled_from([[2, 4], [1, 4], [1, 3, 4], [2, 2, 6]]))
    hidden = shape[-1]
    bad = _perturbation(draw, ["broadcast", "axis", "mean_out", "mul", "rank4"])
    if bad == "rank4":
        shape = [1, *shape] if len(shape) == 3 else [1, 1, *shape]
    tags = [f"shape={shape}", f"bad={bad}"]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = b.input("x", F32, shape)
    h = b.input("h", F32, [hidden] if bad == "broadcast" else shape)
    first = len(b.nodes)
    s = _binary(b, draw, "Mul" if bad == "mul" else "Add", x, h)
    axis = -2 if bad == "axis" else draw(st.sampled_from([-1, len(shape) - 1]))
    norm_shape = shape[-2:] if bad == "axis" else [hidden]
    ins = [s, b.const((rng.standard_normal(norm_shape) + 1).astype(np.float32), np.float32)]
    if draw(st.booleans()):
        ins.append(b.const(rng.standard_normal(norm_shape).astype(np.float32), np.float32))
    outs = [b.fresh(), b.fresh()] if bad == "mean_out" else [b.fresh()]
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    b.nodes.append(helper.make_node("LayerNormalization", ins, outs, name=b.fresh("n"), axis=axis, epsilon=eps))
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
    custom = _to_custom_domain(draw, b, first, y, tags) if _chance(draw, 1) else None
    return Case("fuse-skip-layer-norm", b.model(), FuseSkipLayerNorm, tuple(tags), atol=1e-4, rtol=1e-3, custom_node=custom)


@st.composite
def decode_attention_cases(draw: Any) -> Case:
    """Attention over a retained cache, as retain-kv-cache and fuse-attention leave it, with near misses.

    One token (decode), or a chunk of S tokens in one row (prefill) whose feeds
    hold consecutive positions from a multiple of S, as the runtime feeds them:
    the rewrite's contract at prefill (the pass cannot see positions). A chunk
    in two rows, or a cache that is not a whole number of chunks, is declined.
    """
    from passes import FuseDecodeAttention

    opset = draw(st.sampled_from([17, 18]))
    b = Builder(opset, const_nodes=draw(st.booleans()))
    b.domains["com.microsoft"] = 1
    bad = _perturbation(draw, ["shifted_mask", "other_indices", "past_reader", "head4", "slot_unproven", "two_tokens"])
    bsz, heads, ctx = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(4, 9))
    h = 4 if bad == "head4" else draw(st.sampled_from([8, 16]))
    s_len = 2 if bad == "two_tokens" else 1
    if bad == "two_tokens" and bsz == 1 and ctx % 2 == 0:
        ctx += 1  # one row would be a chunk: declined for two rows or a cache of an odd number of slots
    chunk = bad != "two_tokens" and draw(st.booleans())
    if chunk:  # one row, a cache of whole chunks
        s_len = draw(st.sampled_from([2, 4]))
        bsz, ctx = 1, s_len * draw(st.integers(1, 3))
    d = heads * h
    tags = [f"B={bsz} N={heads} H={h} C={ctx} S={s_len}", f"bad={bad}"]
    pos = b.input("position_ids", I64, [bsz, s_len])
    zero = b.const(np.int64(0), np.int64)
    # mask[b, 0, q, j] = 0 if j <= pos[b, q] else -10000
    shown_pos = b.op("Add", [pos, b.const(np.int64(1), np.int64)]) if bad == "shifted_mask" else pos
    visible = b.op("LessOrEqual", [b.const(np.arange(ctx).reshape(1, 1, 1, ctx), np.int64), b.unsqueeze(shown_pos, [1, 3])])
    mask = b.op("Where", [visible, b.const(np.float32(0), np.float32), b.const(np.float32(-10000), np.float32)])
    # The slot written: the position itself, or retain-kv-cache's padding chain around it.
    spelling = "unproven" if bad == "slot_unproven" else draw(st.sampled_from(["plain", "chain"]))
    tags.append(f"slot={spelling}")
    if spelling == "chain":
        axes = b.const([1], np.int64)
        maxpos = b.op("ReduceMax", [pos, axes], keepdims=1) if opset >= 18 else b.op("ReduceMax", [pos], axes=[1], keepdims=1)
        target = b.op("Where", [b.op("GreaterOrEqual", [pos, zero]), pos, maxpos])
        slot = b.op("Where", [b.op("Less", [target, zero]), b.const(np.int64(ctx - 1), np.int64), target])
    elif spelling == "unproven":  # equal to the position only by the feeds' luck
        slot = b.op("Max", [pos, zero])
    else:
        slot = pos
    slot4 = b.unsqueeze(slot, [1, 3])
    if heads > 1 or s_len > 1 or draw(st.booleans()):
        slot4 = b.op("Expand", [slot4, b.const([bsz, heads, s_len, 1], np.int64)])
    grids = np.meshgrid(np.arange(bsz), np.arange(heads), np.zeros(s_len, np.int64), indexing="ij")
    parts = [b.const(g[..., None].astype(np.int64), np.int64) for g in grids[:2]]
    indices = b.op("Concat", [*parts, slot4], axis=-1)
    value_indices = b.op("Concat", [*parts, slot4], axis=-1) if bad == "other_indices" else indices
    # q, k, v: one packed projection split three ways, or three inputs.
    if draw(st.booleans()):
        qkv = b.input("qkv", F32, [bsz, s_len, 3 * d])
        if opset >= 18:
            q, k, v = (b.fresh() for _ in range(3))
            b.nodes.append(helper.make_node("Split", [qkv], [q, k, v], name=b.fresh("n"), axis=-1, num_outputs=3))
        else:
            q, k, v = (b.fresh() for _ in range(3))
            b.nodes.append(helper.make_node("Split", [qkv, b.const([d, d, d], np.int64)], [q, k, v], name=b.fresh("n"), axis=2))
        tags.append("packed")
    else:
        q, k, v = (b.input(n, F32, [bsz, s_len, d]) for n in ("q", "k", "v"))
    outs = {}
    copy = None
    if chunk and draw(st.booleans()):  # retain-kv-cache's padding copy: each padding token takes the last valid one's values
        steps = b.const(np.arange(s_len).reshape(1, s_len), np.int64)
        last = b.op("ArgMax", [pos], axis=1, keepdims=1)
        copy = b.op("Reshape", [b.op("Where", [b.op("GreaterOrEqual", [pos, zero]), steps, last]), b.const([s_len], np.int64)])
        tags.append("padding-copy")
    for role, x, idx in (("key", k, indices), ("value", v, value_indices)):
        if s_len > 1:  # the head split of several tokens moves elements
            x4 = b.op("Transpose", [b.op("Reshape", [x, b.const([bsz, s_len, heads, h], np.int64)])], perm=[0, 2, 1, 3])
            if copy is not None:
                x4 = b.op("Gather", [x4, copy], axis=2)
        elif heads == 1 and draw(st.booleans()):
            x4 = b.unsqueeze(x, [1])
        else:
            x4 = b.op("Reshape", [x, b.const([bsz, heads, 1, h], np.int64)])
        past = b.input(f"past_{role}.0", F32, [bsz, heads, ctx, h])
        if role == "key" and bad == "past_reader":
            b.output(b.op("ReduceSum", [past], keepdims=0), F32, [])
        outs[role] = b.op("ScatterND", [past, idx, x4], out=f"past_{role}.0_RetainedState")
        b.output(outs[role], F32, [bsz, heads, ctx, h])
    attrs = {"num_heads": heads} | ({"scale": float(draw(st.sampled_from([0.5, 1 / np.sqrt(h)])))} if draw(st.booleans()) else {})
    y = b.fresh()
    b.nodes.append(helper.make_node("MultiHeadAttention", [q, outs["key"], outs["value"], "", "", mask], [y], name=b.fresh("n"),
                                    domain="com.microsoft", **attrs))  # fmt: skip
    b.output(y, F32, [bsz, s_len, d])
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    positions = rng.integers(0, ctx - 1, (bsz, s_len)) if bad == "shifted_mask" else rng.integers(0, ctx, (bsz, s_len))
    if s_len > 1:
        positions = np.sort(positions, axis=1)
    if chunk:  # the runtime's chunks: consecutive positions from a multiple of S
        positions = (s_len * rng.integers(0, ctx // s_len) + np.arange(s_len)).reshape(1, s_len)
        if bad == "shifted_mask":  # the shifted mask must not reach past the cache
            positions = np.minimum(positions, ctx - 2)
    return Case("fuse-decode-attention", b.model(), FuseDecodeAttention, tuple(tags), atol=1e-4, rtol=1e-3,
                feeds={"position_ids": positions.astype(np.int64)}, shared_state=True)  # fmt: skip


#: The strategy of each pass, by name.
STRATEGIES: dict[str, st.SearchStrategy[Case]] = {
    "fuse-layer-norm": layer_norm_cases(),
    "fuse-rms-norm": rms_norm_cases(),
    "fuse-gelu": gelu_cases(),
    "fold-constants": fold_constants_cases(),
    "pin-static-shapes": pin_static_shapes_cases(),
    "clip-fp16": clip_fp16_cases(),
    "retain-kv-cache": retain_kv_cache_cases(),
    "legalize-qnn": legalize_qnn_cases(),
    "cleanup": cleanup_cases(),
    "fuse-attention": attention_cases(),
    "simplify-shapes": simplify_shapes_cases(),
    "fuse-skip-layer-norm": skip_layer_norm_cases(),
    "fuse-decode-attention": decode_attention_cases(),
}


# --------------------------------------------------------------------------- the check


@dataclass
class Outcome:
    kind: str  # "rewrite", "decline" or "refused"
    detail: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def check(case: Case) -> Outcome:
    """Run the case's pass; return what it did, or raise AssertionError (a failure). See the module docstring."""
    original = Graph.from_proto(case.model)
    reference = Graph.from_proto(case.model)
    reference.cleanup()
    try:
        reference.check()
    except QGraphError as e:
        raise AssertionError(f"the generated graph itself is invalid (a bug in the strategy): {e}") from None
    graph = Graph.from_proto(case.model)
    p = case.make_pass()
    try:
        result = p.run(graph)
    except QGraphError as e:
        return Outcome("refused", f"{type(e).__name__}: {e}")
    out = result.graph
    out.cleanup()
    if not result.modified:
        # Unchanged means the same nodes, edges and constants; shape inference may refine the outputs' declared shapes.
        for g in (out, reference):
            for t in g.outputs:
                t.shape = None
        if canonical_text(out) != canonical_text(reference):
            raise AssertionError(f"{case.pass_name} reported no change but changed the graph (stats {result.stats})")
        return Outcome("decline", "", dict(result.stats))
    out.check()
    if case.custom_node is not None:
        kept = [n for n in out.nodes if n.name == case.custom_node and n.domain == CUSTOM_DOMAIN]
        if not kept:
            raise AssertionError(f"{case.pass_name} rewrote the custom-domain node '{case.custom_node}' (stats {result.stats})")
        return Outcome("rewrite", "custom node kept; onnxruntime cannot run it", dict(result.stats))
    if case.kv is not None:
        _compare_decode_step(original, out, case)
    else:
        _compare(original, out, case)
    if case.idempotent:
        again = case.make_pass().run(out)
        if again.modified:
            raise AssertionError(f"{case.pass_name} is not idempotent: a second run changed the graph again ({again.stats})")
    return Outcome("rewrite", "", dict(result.stats))


def _compare(before: Graph, after: Graph, case: Case) -> None:
    feeds = case.feeds
    if feeds:
        sa, sb = session(before), session(after)
        names = [o.name for o in sa.get_outputs()]
        inputs = {i.name for i in sa.get_inputs()}
        rng = np.random.default_rng(0)
        full = {}
        for i in sa.get_inputs():
            if i.name in feeds:
                full[i.name] = feeds[i.name]
            else:
                shape = [int(d) for d in i.shape]
                full[i.name] = (rng.integers(0, 2, shape).astype(bool) if "bool" in i.type else
                                rng.standard_normal(shape).astype(np.float32) if "float" in i.type else rng.integers(-5, 5, shape))  # fmt: skip
        ra = sa.run(names, {k: v for k, v in full.items() if k in inputs})
        feeds_b = {k: v for k, v in full.items() if k in {i.name for i in sb.get_inputs()}}
        rb = run_shared_state(sb, feeds_b, names) if case.shared_state else sb.run(names, feeds_b)
        for name, x, y in zip(names, ra, rb):
            np.testing.assert_allclose(y, x, atol=case.atol, rtol=case.rtol, err_msg=f"output {name} differs")
        return
    for seed in (0, 1):
        assert_same_outputs(before, after, atol=case.atol, rtol=case.rtol, seed=seed, dims=case.dims, shared_state=case.shared_state)


def _compare_decode_step(raw: Graph, retained: Graph, case: Case) -> None:
    """One decode step: the raw graph with a past of ``past_len``, the retained one with that past in a ctx_len cache."""
    kv = case.kv
    assert kv is not None
    rng = np.random.default_rng(kv["seed"])
    B, P, C = kv["batch"], kv["past_len"], kv["ctx"]  # noqa: N806
    shape = (B, kv["heads"], P, kv["head_dim"])
    ids = rng.integers(0, kv["vocab"], (B, 1)).astype(np.int64)
    pos = np.full((B, 1), P, np.int64)
    past = {f"past_{r}.{i}": rng.standard_normal(shape).astype(np.float32) for i in range(kv["layers"]) for r in ("key", "value")}
    ref_sess = session(raw)
    ref_names = [o.name for o in ref_sess.get_outputs()]
    ref = dict(zip(ref_names, ref_sess.run(None, {"input_ids": ids, "attention_mask": np.ones((B, P + 1), np.int64), "position_ids": pos,
                                                  **past})))  # fmt: skip
    cache = {}
    for n, v in past.items():
        c = rng.standard_normal((B, kv["heads"], C, kv["head_dim"])).astype(np.float32) * 10  # garbage the mask must hide
        c[:, :, :P] = v
        cache[n] = c
    sess = session(retained)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {"input_ids": ids, "position_ids": pos, **cache})))
    np.testing.assert_allclose(got["logits"][:, 0], ref["logits"][:, -1], atol=1e-4, rtol=1e-3, err_msg="logits differ")
    for n in past:
        present = ref[n.replace("past_", "present_")]
        new = got[f"{n}_RetainedState"]
        np.testing.assert_allclose(new[:, :, : P + 1], present, atol=1e-5, err_msg=f"{n}: written slots differ")
        np.testing.assert_array_equal(new[:, :, P + 1 :], cache[n][:, :, P + 1 :], err_msg=f"{n}: slots after the step changed")
