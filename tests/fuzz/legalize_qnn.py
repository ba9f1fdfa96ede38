"""legalize-qnn: GatherND with constant or run-time indices, on bool, float or int data."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from onnx import TensorProto

from fuzz.builder import BOOL, F32, I64, Builder, Case, chance, to_custom_domain


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
    custom = to_custom_domain(draw, b, first, y, tags) if chance(draw, 1) else None
    return Case("legalize-qnn", b.model(), LegalizeQnn, tuple(tags), feeds={"i": idx}, idempotent=False, custom_node=custom)
