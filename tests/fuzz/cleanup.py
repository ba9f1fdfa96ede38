"""cleanup: the norm or GELU graphs with their nodes shuffled and dead nodes added."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from onnx import helper

from fuzz.builder import Case
from fuzz.gelu import gelu_cases
from fuzz.layer_norm import layer_norm_cases


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
