"""Simplify layout ops that static shapes make trivial (run after pin-static-shapes).

With every shape pinned, some layout ops do nothing or can be merged, and each
costs a kernel launch (about 5-10 us on ONNX Runtime's CPU provider, more on an
accelerator's queue). At gpt2-small decode this pass removes 24
``GatherElements`` and turns 24 ``Transpose`` into merged ``Reshape``s
(PERFORMANCE.md). The rules, each needing the static shapes it reads:

* ``GatherElements(data, indices, axis)`` whose gathered axis has size 1 and
  whose indices have the data's shape is the data itself: the only valid index
  on a size-1 axis is 0 (or -1). retain-kv-cache's gather of the valid new
  tokens is this at decode (one token).
* ``GatherElements(data, Expand(I), axis)`` whose line of indices ``I`` varies
  along ``axis`` alone is ``Gather(data, I as 1-D, axis)``: rows copied whole
  instead of element by element. retain-kv-cache's copy of the last valid token
  into padding positions is this at prefill with one row (24 in GPT-2:
  prefill -0.5 ms).
* a ``Transpose`` that only moves size-1 axes keeps the elements in order: it
  becomes a ``Reshape`` to its output shape.
* ``Reshape(Reshape(x))`` reads ``x`` directly, with the outer output shape.
* a ``Reshape``, ``Expand`` or ``Identity`` whose output has its input's shape
  (and is not a graph output) is removed.
* row-wise regions go to two dimensions. Exporters write each linear layer as
  ``Reshape([a..., k] -> [m, k])``, ``Gemm``, ``Reshape([m, n] -> [a..., n])``,
  so between two layers the activations are 3-D only to be flattened again.
  Ops that treat each row of the last axis alone (elementwise ops with
  row-broadcast operands, LayerNormalization and Split over the last axis)
  give the same rows on ``[m, k]``. The pass grows each region of such ops
  from a flattening Reshape, and when that removes more Reshapes than it must
  add at the region's edges (where a tensor meets an op that needs the leading
  axes, such as attention, or comes from one), it makes the region 2-D.
  GPT-2 at decode: 72 Reshapes go and 3 come, of 120 (about 3.7 us each,
  PERFORMANCE.md).

Custom-domain ops named like these are left alone.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from passes.matching import bypass
from passes.shapes import read_through, static_dims, unit_transpose
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.ir.validate import is_onnx_op
from qgraph.pipeline.manager import Pass, PassResult

log = logging.getLogger(__name__)

#: The ops this pass looks at.
_OPS = frozenset({"GatherElements", "Transpose", "Reshape", "Expand", "Identity"})
#: One-input ops that act on each element alone.
_UNARY = frozenset({"Relu", "Gelu", "Tanh", "Sigmoid", "Erf", "Neg", "Abs", "Sqrt", "Exp", "Identity", "Cast"})
#: Two-input elementwise ops (numpy broadcasting).
_BINARY = frozenset({"Add", "Sub", "Mul", "Div"})


def _static(t: Tensor) -> list[int] | None:
    return static_dims(t.shape)


class SimplifyShapes(Pass):
    """Drop or merge layout ops that static shapes make trivial (see the module docstring)."""

    name = "simplify-shapes"
    requires = ("static_shapes",)
    produces = ("shapes_simplified",)
    invalidates = ("no_dead_nodes",)

    def run(self, graph: Graph) -> PassResult:
        graph.infer_shapes_if_missing((n.outputs[0] for n in graph.nodes if n.op in _OPS and n.outputs), self.name)
        stats: dict[str, int] = {}

        def count(key: str, n: int = 1) -> None:
            stats[key] = stats.get(key, 0) + n

        lines: dict[int, Tensor] = {}  # 1-D index per shared line of indices
        for node in list(graph.nodes):
            if not node.outputs or not node.inputs:
                continue  # removed earlier in this sweep
            out = node.outputs[0]
            if is_onnx_op(node, "GatherElements") and self._unit_gather(node):
                if bypass(graph, node, node.inputs[0]):
                    count("gather_elements")
            elif is_onnx_op(node, "GatherElements") and (line := self._line_indices(graph, node)) is not None:
                self._to_gather(graph, node, line, lines)
                count("gather_elements_to_gather")
            elif unit_transpose(node):
                shape = _static(out)
                assert shape is not None
                node.op = "Reshape"
                node.attrs = {}
                node.inputs.append(graph.constant(self.name, np.array(shape, np.int64)))
                count("transpose_to_reshape")
                self._merge_reshape(graph, node, count)
            elif is_onnx_op(node, "Reshape"):
                self._merge_reshape(graph, node, count)
            elif is_onnx_op(node, "Expand", "Identity"):
                shape = _static(out)
                if shape is not None and shape == _static(node.inputs[0]) and bypass(graph, node, node.inputs[0]):
                    count(node.op.lower())
        self._flatten_rows(graph, count)
        log.info("%s: %s", self.name, stats or "nothing to simplify")
        return PassResult(graph, bool(stats), stats)

    # ------------------------------------------------------------------ row-wise regions
    def _flatten_rows(self, graph: Graph, count: Any) -> None:
        seen: set[int] = set()
        for node in list(graph.nodes):
            if not node.outputs or id(node.outputs[0]) in seen or _unflatten_shape(node) is None:
                continue
            region = _Region.grow(graph, node.outputs[0])
            if region is None:
                continue
            seen.update(id(t) for t in region.tensors)
            plan = region.plan(graph)
            removed, added = _Region.edges(plan)
            if removed > added:
                region.apply(graph, plan, self.name)
                count("row_regions_flattened")
                count("row_reshapes_removed", removed)
                count("row_reshapes_added", added)

    @staticmethod
    def _unit_gather(node: Node) -> bool:
        data, indices = node.inputs[0], node.inputs[1]
        shape = _static(data)
        if shape is None or not shape or shape != _static(indices) or shape != _static(node.outputs[0]):
            return False
        axis = int(node.attrs.get("axis", 0))
        axis = axis + len(shape) if axis < 0 else axis
        return 0 <= axis < len(shape) and shape[axis] == 1

    @staticmethod
    def _line_indices(graph: Graph, node: Node) -> Tensor | None:
        """The line ``I`` of ``GatherElements(data, Expand(I), axis)`` when ``I`` varies along ``axis`` only.

        Then every position along the other axes gathers the same index, which is
        ``Gather(data, I as 1-D, axis)``: one row copy per index instead of one
        element per index (retain-kv-cache's padding copy at prefill with one row).
        """
        data, indices = node.inputs[0], node.inputs[1]
        shape, ishape = _static(data), _static(indices)
        if shape is None or ishape is None or len(shape) != len(ishape) or _static(node.outputs[0]) != ishape:
            return None
        axis = int(node.attrs.get("axis", 0))
        axis = axis + len(shape) if axis < 0 else axis
        if not 0 <= axis < len(shape) or any(ishape[j] != shape[j] for j in range(len(shape)) if j != axis):
            return None
        expand = graph.producer(indices)
        line = expand.inputs[0] if is_onnx_op(expand, "Expand") else indices
        lshape = _static(line)
        if lshape is None or len(lshape) != len(shape) or lshape[axis] != ishape[axis]:
            return None
        return line if all(d == 1 for j, d in enumerate(lshape) if j != axis) else None

    def _to_gather(self, graph: Graph, node: Node, line: Tensor, lines: dict[int, Tensor]) -> None:
        flat = lines.get(id(line))
        if flat is None:
            n = int(np.prod(_static(line) or [1]))
            reshape = graph.add_node(
                "Reshape", [line, graph.constant(self.name, np.array([n], np.int64))], 1, prefix=self.name, before=node
            )
            flat = lines[id(line)] = reshape.outputs[0]
        node.op = "Gather"
        node.inputs[1] = flat

    def _merge_reshape(self, graph: Graph, node: Node, count: Any) -> None:
        """Reshape(Reshape(x)) -> Reshape(x, static shape); a Reshape to its own input's shape is removed."""
        shape = _static(node.outputs[0])
        if shape is None:
            return
        if read_through(graph, node, self.name):
            count("reshape_merged")
        if shape == _static(node.inputs[0]) and bypass(graph, node, node.inputs[0]):
            count("reshape_removed")


def _unflatten_shape(node: Node) -> list[int] | None:
    if not is_onnx_op(node, "Reshape") or not node.outputs:
        return None
    src, out = _static(node.inputs[0]), _static(node.outputs[0])
    if src is None or out is None or len(src) != 2 or len(out) < 3 or out[-1] != src[1]:
        return None
    return out


def _rank2_row(shape: list[int] | None, lead: list[int]) -> bool:
    """True if ``shape`` is ``[prod(lead), k]``: the flat form of a region tensor."""
    return shape is not None and len(shape) == 2 and shape[0] == int(np.prod(lead))


class _Region:
    """Tensors of shape ``[*lead, k]`` joined by row-wise ops, and the Reshapes at their edges."""

    def __init__(self, lead: list[int]) -> None:
        self.lead = lead
        self.tensors: list[Tensor] = []
        self.ops: dict[int, Node] = {}

    @classmethod
    def grow(cls, graph: Graph, seed: Tensor) -> _Region | None:
        shape = _static(seed)
        assert shape is not None
        region = cls(shape[:-1])
        seen = {id(seed)}
        queue = [seed]
        while queue:
            t = queue.pop()
            if graph.is_graph_output(t):
                return None
            region.tensors.append(t)
            neighbours = [graph.producer(t), *graph.consumers(t)]
            for node in neighbours:
                if node is None or id(node) in region.ops:
                    continue
                rows = region._row_tensors(graph, node)
                if rows is None:
                    continue
                region.ops[id(node)] = node
                for r in rows:
                    if id(r) not in seen:
                        seen.add(id(r))
                        queue.append(r)
        return region

    def _is_row(self, t: Tensor) -> bool:
        s = _static(t)
        return s is not None and len(s) == len(self.lead) + 1 and s[:-1] == self.lead

    def _row_tensors(self, graph: Graph, node: Node) -> list[Tensor] | None:
        """The region tensors a row-wise ``node`` reads and writes, or None if it is not row-wise here."""
        if any(not self._is_row(o) for o in node.outputs) or len(node.outputs) == 0:
            return None
        ins = [t for t in node.inputs if t.name]  # an omitted optional input has no name
        if is_onnx_op(node, *_UNARY) or (node.domain == "com.microsoft" and node.op in ("Gelu", "FastGelu")):
            rows, rest = ins[:1], ins[1:]
        elif is_onnx_op(node, *_BINARY):
            rows = [t for t in ins if self._is_row(t)]
            rest = [t for t in ins if not self._is_row(t)]
        elif is_onnx_op(node, "LayerNormalization"):
            if not self._last_axis(node, -1) or len(node.outputs) != 1:
                return None
            rows, rest = ins[:1], ins[1:]
        elif is_onnx_op(node, "Split"):
            if not self._last_axis(node, 0):
                return None
            rows, rest = ins[:1], []  # the split sizes are a 1-D input
        else:
            return None
        # Each row operand must be a region tensor, as wide as the output unless a Split cuts it.
        width = None if is_onnx_op(node, "Split") else node.outputs[0].shape[-1]
        if not rows or not all(self._is_row(t) and width in (None, t.shape[-1]) for t in rows):
            return None
        for t in rest:  # operands that broadcast along the rows: rank <= 1, or [1, k]
            s = _static(t)
            if s is None or len(s) > 2 or (len(s) == 2 and s[0] != 1):
                return None
        return [*rows, *node.outputs]

    def _last_axis(self, node: Node, default: int) -> bool:
        axis = int(node.attrs.get("axis", default))
        return axis in (-1, len(self.lead))

    # ------------------------------------------------------------------ edges
    def _classify(self, graph: Graph, t: Tensor) -> tuple[str, list[Node], list[Node], list[Node]]:
        """(producer kind, flattening Reshapes to drop, ops that read it in the region or as any 1-D/2-D
        Reshape, ops that need it with its leading axes)."""
        p = graph.producer(t)
        kind = "op" if p is not None and id(p) in self.ops else "unflatten" if p is not None and _unflatten_shape(p) else "other"
        drop, keep, needs = [], [], []
        for c in graph.consumers(t):
            if id(c) in self.ops:
                keep.append(c)
            elif is_onnx_op(c, "Reshape") and c.inputs[0] is t and c.inputs[1] is not t:
                target = graph.const_value(c.inputs[1])
                out = _static(c.outputs[0])
                zero_copies = target is None or (0 in target.tolist() and not int(c.attrs.get("allowzero", 0)))
                if zero_copies:
                    needs.append(c)
                elif _rank2_row(out, self.lead) and not graph.is_graph_output(c.outputs[0]):
                    drop.append(c)
                else:
                    keep.append(c)  # reshapes whatever the input's leading axes are
            else:
                needs.append(c)
        return kind, drop, keep, needs

    def plan(self, graph: Graph) -> list[tuple[Tensor, str, list[Node], list[Node], list[Node]]]:
        """Each region tensor with its classification (see ``_classify``), taken before any edit."""
        return [(t, *self._classify(graph, t)) for t in self.tensors]

    @staticmethod
    def edges(plan: list[tuple[Tensor, str, list[Node], list[Node], list[Node]]]) -> tuple[int, int]:
        """(Reshapes that flattening the region removes, Reshapes it adds at the region's edges)."""
        removed = added = 0
        for _, kind, drop, _, needs in plan:
            removed += len(drop) + (kind == "unflatten")
            added += 1 if kind == "other" else int(bool(needs))
        return removed, added

    def apply(self, graph: Graph, plan: list[tuple[Tensor, str, list[Node], list[Node], list[Node]]], prefix: str) -> None:
        flat = int(np.prod(self.lead))
        for node in self.ops.values():
            if "axis" in node.attrs and is_onnx_op(node, "LayerNormalization", "Split"):
                node.attrs["axis"] = -1
        for t, kind, drop, keep, needs in plan:
            shape = _static(t)
            assert shape is not None
            flat_shape = [flat, shape[-1]]
            producer = graph.producer(t)
            # New Reshapes go right behind the tensor's producer (or before its first reader), in order.
            where: dict[str, Node] = {"after": producer} if producer is not None else {
                "before": min(graph.consumers(t), key=graph.position)}  # fmt: skip
            if kind == "op":
                src = t
            elif kind == "unflatten":
                assert producer is not None
                src = producer.inputs[0]
            else:
                src = graph.variable(prefix, dtype=t.dtype, shape=flat_shape)
                graph.add_node("Reshape", [t, graph.constant(prefix, np.array(flat_shape, np.int64))], [src], prefix=prefix, **where)
            if needs and kind != "other":
                full = graph.variable(prefix, dtype=t.dtype, shape=shape)
                graph.add_node("Reshape", [src, graph.constant(prefix, np.array(shape, np.int64))], [full], prefix=prefix, **where)
                _rewire(needs, t, full)
            for f in drop:
                graph.replace_uses(f.outputs[0], src)
            graph.remove_nodes(drop)
            _rewire(keep, t, src)
            if kind == "unflatten":
                graph.remove_nodes([producer])
            elif kind == "op":
                t.shape = flat_shape


def _rewire(nodes: list[Node], old: Tensor, new: Tensor) -> None:
    for n in nodes:
        for k, t in enumerate(n.inputs):
            if t is old:
                n.inputs[k] = new
