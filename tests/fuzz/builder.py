"""What every fuzz strategy shares: the :class:`Case` it draws, a small graph :class:`Builder`, and drawing helpers.

A strategy draws a :class:`Case`: an ONNX model, the pass to run on it and how
to compare the result. The pattern comes in the spellings the pass accepts, and,
with some probability, perturbed (:func:`perturbation`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qgraph.pipeline.manager import Pass

F32, F16, F64, I64, BOOL = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL
NP = {F32: np.float32, F16: np.float16, F64: np.float64, I64: np.int64, BOOL: np.bool_}
DTYPE_NAMES = {F32: "fp32", F16: "fp16", F64: "fp64"}
#: A one-element constant of this shape broadcasts any rank-2 or rank-3 tensor to rank 4.
HIGH_RANK = (1, 1, 1, 1)


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
    shared_state: bool | str = False  # run the rewritten graph (and with "both" the original) with caches updated in place
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


def chance(draw: Any, tenths: int) -> bool:
    """True with probability ``tenths``/10."""
    return bool(draw(st.integers(0, 9)) < tenths)


def perturbation(draw: Any, options: list[str]) -> str:
    """ "none" (the plain pattern) or one of ``options``."""
    return str(draw(st.sampled_from(["none"] * max(3, len(options) // 2) + options)))


CUSTOM_DOMAIN = "com.example"


def to_custom_domain(draw: Any, b: Builder, first: int, final: str, tags: list[str]) -> str:
    """Move one live node made since ``first`` (not a Constant) to a custom domain; returns its name."""
    used = {i for n in b.nodes for i in n.input} | {final}
    node = draw(st.sampled_from([n for n in b.nodes[first:] if n.op_type != "Constant" and n.output[0] in used]))
    node.domain = CUSTOM_DOMAIN
    b.domains[CUSTOM_DOMAIN] = 1
    tags.append(f"custom={node.op_type}")
    return str(node.name)


def binary(b: Builder, draw: Any, op: str, a: str, c: str) -> str:
    """``op(a, c)`` with the operands in a random order (Add and Mul commute)."""
    return b.op(op, [a, c] if draw(st.booleans()) else [c, a])


def float_input(draw: Any, b: Builder, dtype: int, width: int | None = None) -> tuple[str, list[int | str], int | None]:
    """A graph input ``x`` of rank 2 or 3 (maybe a symbolic batch or last dim): (name, shape, last dim if known).

    Also decides whether the model keeps the shapes of its intermediates.
    """
    b.value_info = draw(st.booleans())
    rank = draw(st.integers(2, 3))
    width = width if width is not None else draw(st.integers(1, 8))
    shape: list[int | str] = [draw(st.integers(1, 3)) for _ in range(rank - 1)] + [width]
    if chance(draw, 3):
        shape[0] = "batch"
    last: int | None = width
    if chance(draw, 1):
        shape[-1] = "width"
        last = None
    x = b.input("x", dtype, shape)
    return x, shape, last


def vector(draw: Any, width: int, dtype: Any, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    seed = draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).uniform(low, high, width).astype(dtype)
