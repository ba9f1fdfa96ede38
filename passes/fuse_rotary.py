"""Fuse rotate-half rotary position embeddings (RoPE) into ONNX's ``RotaryEmbedding`` (opset 23).

    # y = x * cos + rotate_half(x) * sin,   rotate_half(x) = Concat(-x[..., h:], x[..., :h]),  h = head_dim / 2
    # cos, sin = f(position_ids), [batch, 1, seq, head_dim], two copies of one half along head_dim

becomes ``RotaryEmbedding(x, cos_cache, sin_cache, Max(position_ids, 0))``
with ``interleaved=0``. The caches ``[positions, head_dim / 2]`` are constants:
the graph's own cos/sin subgraph evaluated for positions 0 .. n - 1
(:mod:`passes.rope_tables`), so any frequency formula (rope_scaling ``linear``,
``llama3``, an attention scaling factor) comes with it. n is the ``positions``
the pass is made with (a compile's ctx_len), else the length of the retained
caches when that is a number; positions at or past n fail at run
time (ONNX Runtime checks them), as they would write past the cache anyway.
Padding positions (-1) read row 0: only padding tokens see those values, and
nothing reads what they compute.

x is ``[batch, heads, seq, head_dim]`` (the layout Hugging Face rotates in); a
partial rotary (Phi's: the first channels rotated, the rest passed) rotates a
slice of the heads, which is then x.
When x is the usual head split ``Transpose(Reshape(y, [B, S, N, H]), [0, 2, 1,
3])`` the fused node rotates y itself (3-D, ``num_heads`` = N) and the head
split follows it, so the attention fusions still find the head split they
take apart. Anchored at the Add; either operand order of the Add and Muls;
the slices' bounds must be constants (a pinned graph's are).

The pass belongs to the ``cpu`` target's legalize slot: the standard-ops form
stays for QNN and Cloud AI 100, whose compilers take elementwise ops. Declined
with the reason: slices that are not the two halves of head_dim, cos/sin that are not a
per-position function of one int64 tensor of positions, an unknown number of
positions, shapes that are not known, intermediates used elsewhere, custom ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from passes.const_values import const_value
from passes.dtypes import dtype_name, onnx_dtype, tensor_dtype
from passes.matching import Role, last_in_order, leak, sole_consumer
from passes.opset import OpsetFusionPass
from passes.pattern import Miss, Op, Var, match_node
from passes.rope_tables import RopeTables, rope_tables
from qgraph.ir.contract import RETAINED_SUFFIX
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.pipeline.fusion import Match
from qgraph.pipeline.manager import PassResult

ROTARY_OPSET = 23
#: The largest slice end that means "to the end of the axis" (exporters write INT64_MAX or the axis length).
TO_THE_END = np.iinfo(np.int64).max

# x * cos + Concat(Neg(x[..., h:]), x[..., :h]) * sin: the Add's and Muls' operands in either order
ROTATE_HALF = Op("Concat", Op("Neg", Op("Slice", Var("x"), name="upper", role="x[..., h:]"), name="neg", role="-x[..., h:]"),
                 Op("Slice", Var("x", why="the two halves of rotate_half slice different tensors"), name="lower", role="x[..., :h]"),
                 name="rotate_half", role="rotate_half(x)",
                 why="found {found}, expected rotate_half(x) = Concat(Neg(Slice(x)), Slice(x))")  # fmt: skip
ROTARY = Op("Add",
            Op("Mul", ROTATE_HALF, Var("sin"), commute=True, name="mul_sin", role="rotate_half(x) * sin",
               why="no Mul operand of the Add (found {found}), expected rotate_half(x) * sin"),
            Op("Mul", Var("x", why="x * cos multiplies another tensor than rotate_half rotates"), Var("cos"), commute=True,
               name="mul_cos", role="x * cos", why="found {found}, expected x * cos"),
            commute=True, role="x * cos + rotate_half(x) * sin")  # fmt: skip


@dataclass(kw_only=True)
class RotaryMatch(Match):
    x: Tensor
    out: Tensor
    tables: RopeTables
    #: The tensor before the head split ``[B, S, N * H]`` when x is that split (else None), the split's
    #: Reshape and Transpose, and N.
    unsplit: Tensor | None
    split: list[Node]
    num_heads: int


def _ints(graph: Graph, node: Node, index: int) -> list[int] | None:
    if len(node.inputs) <= index or node.inputs[index].is_empty():
        return None
    v = const_value(graph, node.inputs[index])
    return None if v is None else [int(a) for a in v.reshape(-1)]


def _slice_bounds(graph: Graph, node: Node, rank: int) -> tuple[int, int] | str:
    """(start, end) of a Slice over the last axis with step 1, or why it is not one."""
    starts, ends, axes, steps = (_ints(graph, node, i) for i in (1, 2, 3, 4))
    if starts is None or ends is None:
        return f"the bounds of Slice '{node.name}' are not constants"
    if axes is None or len(axes) != 1 or axes[0] not in (-1, rank - 1) or len(starts) != 1 or len(ends) != 1:
        return f"Slice '{node.name}' does not slice the last axis alone"
    if steps is not None and steps != [1]:
        return f"Slice '{node.name}' has steps {steps}, expected 1"
    return starts[0], ends[0]


class FuseRotary(OpsetFusionPass[RotaryMatch]):
    """``x * cos + rotate_half(x) * sin`` -> ``RotaryEmbedding(x, cos_cache, sin_cache, position_ids)``."""

    name = "fuse-rotary"
    produces = ("rotary_fused",)
    anchors = ("Add",)
    stat = "rotary"
    min_opset = ROTARY_OPSET
    fused_op = "RotaryEmbedding"

    def __init__(self, max_matches: int | None = None, *, positions: int | None = None) -> None:
        super().__init__(max_matches)
        self.positions = positions
        self._tables: dict[tuple[int, int, int], RopeTables | str] = {}
        self._made: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def run(self, graph: Graph) -> PassResult:
        self._tables, self._made = {}, {}
        # x's shape says its layout; the head split's say what it splits (a pinned graph carries them)
        wanted = (t for n in graph.nodes if n.op in ("Slice", "Reshape") for t in n.inputs[:1] + n.outputs[:1])
        graph.infer_shapes_if_missing(wanted, self.name)
        return super().run(graph)

    def _count(self, graph: Graph) -> int | str:
        """How many positions the tables hold."""
        if self.positions is not None:
            return self.positions
        retained = {t.name.removesuffix(RETAINED_SUFFIX) for t in graph.outputs if t.name.endswith(RETAINED_SUFFIX)}
        lengths = {t.shape[2] for t in graph.inputs if t.name in retained and t.shape is not None and len(t.shape) == 4}
        if len(lengths) == 1 and isinstance(ctx_len := next(iter(lengths)), int):
            return ctx_len
        return "the number of positions is unknown: no ctx_len was given and the graph has no retained cache of static length"

    def match(self, graph: Graph, anchor: Node) -> RotaryMatch | str:
        # y = x * cos + rotate_half(x) * sin
        found = match_node(graph, ROTARY, anchor)
        if isinstance(found, Miss):
            return found.reason
        x, cos, sin, cat = found.tensor("x"), found.tensor("cos"), found.tensor("sin"), found.node("rotate_half")
        roles: list[Role] = found.roles
        shape = x.shape
        if shape is None or len(shape) != 4 or not isinstance(shape[3], int):
            return f"x is not [batch, heads, seq, head_dim] with a known head_dim (shape {shape})"
        head_dim, half = shape[3], shape[3] // 2
        if len(cat.inputs) != 2 or int(cat.attrs.get("axis", 0)) not in (-1, 3):
            return "rotate_half's Concat does not join two halves along the last axis"
        upper = _slice_bounds(graph, found.node("upper"), 4)
        lower = _slice_bounds(graph, found.node("lower"), 4)
        for b in (upper, lower):
            if isinstance(b, str):
                return b
        if lower != (0, half) or upper[0] != half or not head_dim <= upper[1] <= TO_THE_END or head_dim % 2:  # type: ignore[index]
            return f"rotate_half slices {list(lower)} and {list(upper)} of head_dim {head_dim}: not its two halves"
        if (problem := leak(graph, roles, anchor.outputs[0])) is not None:
            return problem
        count = self._count(graph)
        if isinstance(count, str):
            return count
        key = (id(cos), id(sin), count)
        if key not in self._tables:
            self._tables[key] = rope_tables(graph, cos, sin, head_dim, count)
        tables = self._tables[key]
        if isinstance(tables, str):
            return tables
        pos_shape = tables.positions.shape or []
        if shape[0] != pos_shape[0] or shape[2] != pos_shape[1]:
            return f"x has shape {list(shape)} and the positions {list(pos_shape)}: expected x as [batch, heads, seq, head_dim]"
        x_dtype = tensor_dtype(graph, x)
        if x_dtype != onnx_dtype(tables.cos.dtype):
            return f"x is {dtype_name(x_dtype)} and cos/sin are {tables.cos.dtype}"
        if self.opset_problem:
            return self.opset_problem
        unsplit, split, num_heads = self._head_split(graph, x, roles)
        return RotaryMatch(nodes=[n for _, n in roles], x=x, out=anchor.outputs[0], tables=tables, unsplit=unsplit,
                           num_heads=num_heads, split=split)  # fmt: skip

    @staticmethod
    def _head_split(graph: Graph, x: Tensor, roles: list[Role]) -> tuple[Tensor | None, list[Node], int]:
        """x's [B, S, N * H] source, the head split's nodes and N, when x is only the usual head split of it."""
        tr = graph.producer(x)
        if tr is None or tr.op != "Transpose" or list(tr.attrs.get("perm", [])) != [0, 2, 1, 3]:
            return None, [], 0
        inside = {id(n) for _, n in roles}
        if graph.is_graph_output(x) or any(id(c) not in inside for c in x.outputs):
            return None, [], 0
        rs = graph.producer(tr.inputs[0])
        if rs is None or rs.op != "Reshape" or sole_consumer(graph, tr.inputs[0]) is not tr:
            return None, [], 0
        y, heads = rs.inputs[0], tr.inputs[0].shape
        if y.shape is None or len(y.shape) != 3 or heads is None or len(heads) != 4 or not isinstance(heads[2], int):
            return None, [], 0
        if not (isinstance(y.shape[2], int) and isinstance(heads[3], int) and y.shape[2] == heads[2] * heads[3]):
            return None, [], 0
        return y, [rs, tr], int(heads[2])

    def _shared(self, graph: Graph, m: RotaryMatch, prev: Node) -> tuple[Tensor, Tensor, Tensor]:
        """The cos/sin caches and the clamped positions, made once per table."""
        made = self._made.get(id(m.tables))
        if made is None:
            # padding (-1) reads row 0; nothing reads what a padding token computes
            zero = graph.constant(self.name, np.array(0, np.int64))
            clamp = graph.add_node("Max", [m.tables.positions, zero], 1, prefix=self.name, after=prev)
            made = (graph.constant(self.name, m.tables.cos), graph.constant(self.name, m.tables.sin), clamp.outputs[0])
            self._made[id(m.tables)] = made
        return made

    def rewrite(self, graph: Graph, m: RotaryMatch) -> None:
        prev = last_in_order(graph, m.nodes)
        cos, sin, positions = self._shared(graph, m, prev)
        attrs = {"interleaved": 0}
        if m.unsplit is not None:
            rs, tr = m.split
            rot = graph.add_node("RotaryEmbedding", [m.unsplit, cos, sin, positions], 1, {**attrs, "num_heads": m.num_heads},
                                 prefix=self.name, after=prev)  # fmt: skip
            heads = graph.add_node("Reshape", [rot.outputs[0], rs.inputs[1]], 1, dict(rs.attrs), prefix=self.name, after=rot)
            graph.add_node("Transpose", heads.outputs, [m.out], dict(tr.attrs), prefix=self.name, after=heads)
            graph.remove_nodes([*m.nodes, rs, tr])
        else:
            graph.add_node("RotaryEmbedding", [m.x, cos, sin, positions], [m.out], attrs, prefix=self.name, after=prev)
            graph.remove_nodes(m.nodes)
