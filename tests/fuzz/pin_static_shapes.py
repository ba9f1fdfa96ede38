"""pin-static-shapes: symbolic batch/seq_len (and total_len) pinned to sizes; the shape math must fold and agree."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from fuzz.builder import F32, I64, Builder, Case, chance
from fuzz.shape_math import shape_gadgets


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
    if chance(draw, 1):
        tags.append("unknown_dim_name")
        shape[1] = "mystery"
    x = b.input("x", F32, shape)
    mask = b.input("mask", I64, [names[0], names[2]]) if draw(st.booleans()) else None
    shape_gadgets(draw, b, x, shape, mask, tags)
    if mask is not None:
        b.output(b.op("Cast", [mask], to=F32), F32)
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    ctx = seq + draw(st.integers(0, 3))
    dims = {names[0]: batch, names[1]: seq, names[2]: ctx, "mystery": seq}
    return Case("pin-static-shapes", b.model(), lambda: PinStaticShapes(batch, seq, ctx), tuple(tags), dims=dims, idempotent=False)
