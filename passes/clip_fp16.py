"""Clip to fp16 range: clamp float32 constants into [-65504, 65504] before fp16 runs.

A graph that an accelerator computes in fp16 (QNN HTP runs fp32 graphs in
fp16) turns every constant beyond the fp16 range into an infinity: the
attention masks that exporters fill with ``finfo(float32).min`` (-3.4e38)
become -inf, and ``0 * -inf`` or ``-inf - -inf`` downstream becomes NaN. This
pass clamps finite float32 values into the fp16 range; infinities and NaNs stay
as they are (a mask that is already -inf stays -inf, which is what the graph
meant). In a float16 model (``--dtype float16``) the constants are float16, in
range by construction; the pass looks only at the float32 ones it may hold.

Initializers and ``Constant`` nodes are both looked at. Reading a large weight
means loading it from disk, and a trained weight beyond 65504 is rare, so
constants larger than :data:`SMALL_BYTES` (1 MiB) are checked only with
``check_weights=True``; the number skipped is reported as ``unchecked``.
Subgraphs (If/Loop bodies) are not visited.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from qgraph.ir.graph import Constant, Graph, Node
from qgraph.pipeline.manager import Pass, PassResult

log = logging.getLogger(__name__)

#: The largest finite float16.
FP16_MAX = float(np.finfo(np.float16).max)
#: Constants up to this size are always checked; larger ones only with check_weights.
SMALL_BYTES = 1 << 20


def clip_fp16_values(values: np.ndarray) -> np.ndarray | None:
    """The values clamped into the fp16 range, or None if none was out of it.

    Infinities and NaNs are kept: ``clip(-3.4e38) = -65504``, ``clip(-inf) = -inf``.
    """
    finite = np.isfinite(values)
    over = finite & (np.abs(values) > FP16_MAX)
    if not over.any():
        return None
    # np.where keeps the non-finite values that np.clip would pull in as well.
    return np.where(over, np.clip(values, -FP16_MAX, FP16_MAX), values).astype(values.dtype)


class ClipFp16(Pass):
    """Clamp float32 constants into the fp16 range (see the module docstring).

    ``check_weights`` also loads and checks constants larger than 1 MiB (the
    weights), which costs a full read of them.
    """

    name = "clip-fp16"
    produces = ("fp16_clipped",)

    def __init__(self, *, check_weights: bool = False) -> None:
        self.check_weights = check_weights

    def run(self, graph: Graph) -> PassResult:
        stats = {"clipped": 0, "values": 0, "unchecked": 0}
        for t in graph.tensors().values():
            if isinstance(t, Constant) and self._wanted(t.dtype, _nbytes(t._values), stats):
                arr = graph.const_value(t)
                new = clip_fp16_values(arr) if arr is not None else None
                if new is not None:
                    t.values = new  # now in memory; a later save writes it out again
                    self._count(stats, arr, new, t.name)
        for node in graph.nodes:
            if node.op == "Constant" and node.domain in ("", "ai.onnx", None):
                self._clip_constant_node(node, stats)
        modified = stats["clipped"] > 0
        stats = {k: v for k, v in stats.items() if v}
        log.info("%s: %s", self.name, stats or "nothing out of fp16 range")
        return PassResult(graph, modified, stats)

    def _wanted(self, dtype: Any, nbytes: int, stats: dict[str, int]) -> bool:
        if dtype != np.float32:
            return False
        if nbytes > SMALL_BYTES and not self.check_weights:
            stats["unchecked"] += 1
            return False
        return True

    def _clip_constant_node(self, node: Node, stats: dict[str, int]) -> None:
        attrs = node.attrs
        if "value" in attrs and isinstance(attrs["value"], Constant):
            v = attrs["value"]
            if self._wanted(v.dtype, _nbytes(v._values), stats):
                arr = np.asarray(v.values)
                new = clip_fp16_values(arr)
                if new is not None:
                    v.values = new
                    self._count(stats, arr, new, node.name)
        for key in ("value_float", "value_floats"):
            if key in attrs:
                arr = np.asarray(attrs[key], dtype=np.float32)
                new = clip_fp16_values(arr)
                if new is not None:
                    attrs[key] = float(new) if key == "value_float" else [float(x) for x in new]
                    self._count(stats, arr, new, node.name)

    @staticmethod
    def _count(stats: dict[str, int], old: np.ndarray, new: np.ndarray, where: str) -> None:
        n = int(np.count_nonzero(np.isfinite(old) & (np.abs(old) > FP16_MAX)))
        stats["clipped"] += 1
        stats["values"] += n
        log.debug("clip-fp16: clamped %d values of %s", n, where)


def _nbytes(values: Any) -> int:
    return int(getattr(values, "nbytes", 0))
