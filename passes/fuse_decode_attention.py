"""Attention over a retained cache -> ONNX Runtime's ``com.microsoft.GroupQueryAttention``,
which writes the step's keys and values into the cache itself (run by the ``cpu``
target on each pinned specialization): one token (decode), and a chunk of a
prompt in one row (prefill).

Before (after retain-kv-cache, fuse-attention and simplify-shapes; B rows of S
tokens, N heads of H, D = N * H, a cache of C slots):

    q, k, v = Split(qkv)                                      # [B, S, D] each
    kc = ScatterND(past_key.i, I, heads(k))                   # graph output past_key.i_RetainedState
    vc = ScatterND(past_value.i, I, heads(v))                 # graph output past_value.i_RetainedState
    o = MultiHeadAttention(q, kc, vc, attention_bias=M)

with I[b, h, i] = (b, h, t[b, i]) and M[b, 0, i, j] = 0 if j <= p[b, i] else a
large negative number (p: the positions). ``heads`` is a Reshape to
[B, N, 1, H] for one token; for a chunk, a Reshape to [B, S, N, H], a Transpose
to [B, N, S, H] and retain-kv-cache's padding copy (a Gather that gives each
padding token the last valid token's values). After:

    o, kc, vc = GroupQueryAttention(qkv, past_key.i, past_value.i,
                                    seqlens_k=L, total_sequence_length=C)

Grouped KV heads (Llama-family GQA): the caches hold KV < N heads and the
attention reads them repeated, ``Reshape(Expand(Unsqueeze(kc, 2), [B, KV,
N/KV, C, H]), [B, N, C, H])`` (query head j reads KV head j // (N/KV), as
GroupQueryAttention does); the repeat goes and ``kv_num_heads`` = KV, q, k and
v packed as [B, S, (N + 2 KV) H]. Keys or values computed per head (a rotary
embedding after the head split: [B, KV, S, H] rather than a Reshape of
[B, S, KV * H]) are merged back by a Reshape (a chunk: Transpose + Reshape).

GroupQueryAttention writes token i at slot L[b] - S + 1 + i and lets it attend
to slots 0..L[b] - S + 1 + i.

One token: L = Cast(t, int32). The rewrite needs t[b] = p[b] for every position
a row can hold (0 <= p < C); it proves that from the graph: t is p, or p passed
through ``Where(x >= 0, x, _)`` / ``Where(x < 0, _, x)``, which retain-kv-cache
uses to send padding (p = -1) to a harmless slot. For such padding rows the
write is the same as before, and the row's output (which nothing reads) becomes
attention over slots 0..t instead of over no slot. Past C both fail, as the
ScatterND did.

A chunk (S > 1, one row): L = p[0, 0] + S - 1. Exact for the chunks qgraph's
runtime and contract driver feed, and this is the contract of a prefill graph
the pass rewrote: the row's valid tokens hold consecutive positions p0, p0 + 1,
... from the chunk's first token, padding (-1) only after them, and
p0 + S <= C (the runtime's chunks start at multiples of S, and the pass
requires C to be a multiple of S). The pass proves the rest from the graph: the
slot written is the position (as above), the padding copy keeps every valid
token in place, and the mask's positions are the graph's position input. Each
valid token then writes and reads exactly what it did; padding tokens write
their own values after the last valid slot (instead of the last valid token's
values at its slot), where no later step reads before it writes, and their
outputs (which nothing reads) change. Positions past the cache fail, as before.
Several rows are declined: ONNX Runtime's CPU kernel refuses a chunk over a
cache in more than one row ("batch_size must be 1 when sequence_length > 1 and
past context is given", found by testing).

Per layer this is one kernel instead of eight to twelve (Split, the head
Reshapes and Transposes, the padding copy, two ScatterND, the mask's use,
MultiHeadAttention), and attention reads only the filled slots instead of all
C: decode -0.47 ms/token, prefill of 32 tokens -4 ms for gpt2-small (PERFORMANCE.md).

The cache outputs match the ScatterND's exactly when each past input and its
``_RetainedState`` output share one buffer, as qgraph's runtime binds them. A
caller that feeds the outputs back through separate buffers gets the slots up
to the last valid position right and the slots after it undefined; no later
step reads a slot before a token writes it, so generation is unchanged (the
runtime's double-buffered mode relies on this).

An export with the ONNX ``Attention`` op (dynamo at opset 23 and newer) reaches
this pass the same way: fuse-attention makes its Attention ops
MultiHeadAttention first. One that fuse-attention declines (not float32,
grouped K/V heads, softcap, ...; its near misses say which) stays an opset-23
``Attention`` and runs on ONNX Runtime's kernel, the cache written by ScatterND.

Declined, with a reason: a chunk in several rows or a cache that is not a whole
number of chunks, a head size that is not a multiple of 8 (the CPU kernel
refuses it at run time), a cache that is not a graph input written once by
ScatterND and read by this attention alone, key and value written at different
indices, index, mask or padding-copy structures other than the above, a
non-float32 cache, and MultiHeadAttention with a bias, a key padding mask or its
own past.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from passes.constants import MASK_VALUE, MS_DOMAIN, MS_VERSION
from passes.dtypes import tensor_dtype
from passes.pattern import Const, Miss, Op, Var, match
from passes.positions import equal_when_valid, row_value
from passes.shapes import static_dims
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.ir.validate import is_onnx_op
from qgraph.pipeline.facts import PREFILL_CHUNKS_CONSECUTIVE
from qgraph.pipeline.fusion import FusionPass, Match, only_consumer
from qgraph.pipeline.manager import PassResult

_NOT_ZERO_OR_HIDDEN = "the attention bias is not 0 for shown slots and a large negative number for hidden ones"
_NOT_ARANGE = "the shown slots are not compared against 0..C-1"
# M[b, 0, i, j] = 0 if slots[j] <= p[b, i] else hidden (the constants read as they are, not through Identity)
MASK = Op("Where", Var("visible"), Const("shown", plain=True, why=_NOT_ZERO_OR_HIDDEN), Const("hidden", plain=True, why=_NOT_ZERO_OR_HIDDEN),
          onnx_only=True)  # fmt: skip
SHOWN_SLOTS = Op("LessOrEqual", Const("slots", plain=True, why=_NOT_ARANGE), Var("pos"), onnx_only=True,
                 why="the shown slots are not `slot <= position`")  # fmt: skip
# the cache written at the step's indices
CACHE_WRITE = Op(
    "ScatterND", Var("past"), Var("indices"), Var("updates"), name="write", onnx_only=True, why="not written by a plain ScatterND"
)


@dataclass(kw_only=True)
class DecodeAttentionMatch(Match):
    """The MultiHeadAttention and its two cache writes (``nodes``), and what GroupQueryAttention reads."""

    attention: Node
    key_write: Node
    value_write: Node
    heads: int
    kv_heads: int  # KV heads of the cache (fewer than heads: grouped, repeated before the attention)
    batch: int
    tokens: int  # S: 1 at decode, the chunk's length at prefill
    ctx: int  # C, the cache's slots
    q: Tensor
    k: Tensor
    v: Tensor
    split_heads: tuple[bool, bool]  # whether k, v are [B, KV, S, H] (e.g. after a rotary embedding), not [B, S, KV * H]
    packed: Tensor | None  # the [B, S, 3D] tensor q, k and v are split from, if they are
    slot: Tensor  # the slot each token writes ([B, 1, S, 1])
    positions: Tensor | None  # the graph's [B, S] position input (a chunk only)
    past_k: Tensor
    past_v: Tensor


class FuseDecodeAttention(FusionPass[DecodeAttentionMatch]):
    """ScatterND cache writes + MultiHeadAttention (one token, or a prompt chunk in one row) -> ``com.microsoft.GroupQueryAttention``."""

    name = "fuse-decode-attention"
    requires = ("kv_retained", "static_shapes", "attention_fused", "shapes_simplified")
    produces = ("decode_attention_fused",)
    invalidates = ("no_dead_nodes",)
    anchors = ("MultiHeadAttention",)
    stat = "decode_attention"

    def run(self, graph: Graph) -> PassResult:
        self._seqlens: dict[int, Tensor] = {}
        candidates = [n for n in graph.nodes if n.op == "MultiHeadAttention"]
        graph.infer_shapes_if_missing((t for n in candidates for t in n.inputs if t.name), self.name)
        self._chunks = 0
        result = super().run(graph)
        if self._chunks:
            # GroupQueryAttention over several tokens writes them at consecutive slots: the graph takes the runtime's chunks only.
            result.facts = (PREFILL_CHUNKS_CONSECUTIVE,)
        return result

    def prepare(self, graph: Graph) -> None:
        graph.import_domain(MS_DOMAIN, MS_VERSION)

    def match(self, graph: Graph, anchor: Node) -> DecodeAttentionMatch | str:
        # o = MultiHeadAttention(q, ScatterND(past_k, I, k), ScatterND(past_v, I, v), bias=M), I and M from the positions
        if anchor.domain != MS_DOMAIN:
            return "a MultiHeadAttention outside com.microsoft"
        ins = anchor.inputs
        if len(ins) < 6 or not ins[5].name or any(t.name for t in ins[3:5]) or any(t.name for t in ins[6:]):
            return "the attention takes a bias, a key padding mask or its own past, or no attention bias"
        if len([t for t in anchor.outputs if t.name]) != 1 or int(anchor.attrs.get("unidirectional", 0)):
            return "the attention writes presents or is unidirectional"
        q, mask = ins[0], ins[5]
        heads = int(anchor.attrs.get("num_heads", 0))
        qs = static_dims(q.shape, 3)
        if qs is None:
            return f"the query has no static shape [B, S, D] ({q.shape})"
        b, s, d = qs
        if s > 1 and b > 1:
            # ONNX Runtime 1.32 refuses it at run time: "batch_size must be 1 when sequence_length > 1 and past context is given".
            return f"{s} query tokens in {b} rows: GroupQueryAttention's CPU kernel takes a chunk over a cache in one row only"
        if heads <= 0 or d % heads:
            return f"{heads} heads do not divide the hidden size {d}"
        h = d // heads
        if h % 8:
            return f"the head size {h} is not a multiple of 8, which GroupQueryAttention's CPU kernel needs"
        found_pos = self._mask_positions(graph, mask, b, s)
        if isinstance(found_pos, str):
            return found_pos
        pos, ctx = found_pos
        positions = None
        if s > 1:
            # A chunk of a prompt: GroupQueryAttention writes token i at slot p0 + i (p0: the chunk's first position).
            positions = row_value(graph, pos, b, b * s)
            if not any(x is positions for x in graph.inputs) or static_dims(positions.shape) != [b, s]:
                return "the mask's positions are not the graph's [B, S] position input"
            if ctx % s:
                return f"the cache's {ctx} slots are not a whole number of {s}-token chunks: the last chunk could run past it"
        caches, repeats = [], []
        for role, t in (("key", ins[1]), ("value", ins[2])):
            repeat = _kv_repeat(graph, t, anchor, [b, heads, ctx, h])
            if isinstance(repeat, str):
                return f"the {role} cache: {repeat}"
            cache, kv, nodes = repeat
            found = self._cache(graph, cache, nodes[0] if nodes else anchor, [b, s, kv, h], ctx, positions)
            if isinstance(found, str):
                return f"the {role} cache: {found}"
            caches.append((*found, kv))
            repeats += nodes
        (key_write, past_k, k, k_split, kv), (value_write, past_v, v, v_split, v_kv) = caches
        if kv != v_kv:
            return f"the key cache has {kv} heads and the value cache {v_kv}"
        if key_write.inputs[1] is not value_write.inputs[1]:
            return "the key and value caches are written at different indices"
        slot = self._slot(graph, key_write.inputs[1], [b, kv, s])
        if isinstance(slot, str):
            return slot
        if not equal_when_valid(graph, slot, pos, b, b * s):
            return "the slot written is not shown to be the position the mask uses"
        split = graph.producer(q)
        packed = None
        if (is_onnx_op(split, "Split") and len(split.outputs) == 3 and all(a is b for a, b in zip(split.outputs, (q, k, v))) and int(split.attrs.get("axis", 0)) in (-1, 2)
                and static_dims(split.inputs[0].shape) == [b, s, 3 * d]):  # fmt: skip
            packed = split.inputs[0]
        if k_split or v_split:
            packed = None
        return DecodeAttentionMatch(nodes=[anchor, key_write, value_write, *repeats], attention=anchor, key_write=key_write,
                                    value_write=value_write, heads=heads, kv_heads=kv, batch=b, tokens=s, ctx=ctx, q=q, k=k, v=v,
                                    split_heads=(k_split, v_split), packed=packed, slot=slot, positions=positions,
                                    past_k=past_k, past_v=past_v)  # fmt: skip

    @staticmethod
    def _cache(
        graph: Graph, t: Tensor, anchor: Node, bsnh: list[int], ctx: int, positions: Tensor | None
    ) -> tuple[Node, Tensor, Tensor, bool] | str:
        """(the ScatterND, the past input, the keys or values written, whether they are [B, N, S, H] rather than
        [B, S, N * H]) of a cache read by ``anchor`` (the attention, or the first node of the repeat of its heads)."""
        found = match(graph, CACHE_WRITE, t)
        if isinstance(found, Miss):
            return found.reason
        write = found.node("write")
        if write.attrs.get("reduction", "none") != "none":
            return "not written by a plain ScatterND"
        if not graph.is_graph_output(t) or not only_consumer(t, anchor):
            return "the updated cache is not a graph output read by this attention alone"
        past = write.inputs[0]
        b, s, n, h = bsnh
        shape = static_dims(past.shape, 4)
        if not any(x is past for x in graph.inputs) or not only_consumer(past, write):
            return "the cache written is not a graph input read by its ScatterND alone"
        if shape != [b, n, ctx, h]:
            return f"the cache has shape {past.shape}, not [{b}, {n}, {ctx}, {h}] (the mask's {ctx} slots)"
        if tensor_dtype(graph, past) != TensorProto.FLOAT:
            return "the cache is not float32"
        if s == 1:
            heads = graph.producer(write.inputs[2])  # the head split of one token moves no element
            if static_dims(write.inputs[2].shape) != [b, n, 1, h]:
                return "the step's values are not [B, N, 1, H]"
            if not is_onnx_op(heads, "Reshape", "Unsqueeze") or static_dims(heads.inputs[0].shape) != [b, s, n * h]:
                return write, past, write.inputs[2], True  # computed per head (a rotary embedding): the rewrite merges them
        else:
            written = write.inputs[2]
            copy = graph.producer(written)
            if is_onnx_op(copy, "Gather"):  # retain-kv-cache's padding copy: token i itself wherever p[i] >= 0
                if int(copy.attrs.get("axis", 0)) not in (2, -2) or not _identity_when_valid(graph, copy.inputs[1], positions, s):
                    return "the values written go through a Gather that is not shown to keep every valid token in place"
                written = copy.inputs[0]
            swap = graph.producer(written)
            if static_dims(written.shape) != [b, n, s, h]:
                return f"the chunk's values have shape {written.shape}, not [{b}, {n}, {s}, {h}]"
            heads = graph.producer(swap.inputs[0]) if is_onnx_op(swap, "Transpose") else None
            if (list(swap.attrs.get("perm", [])) != [0, 2, 1, 3] or not is_onnx_op(heads, "Reshape")
                    or static_dims(swap.inputs[0].shape) != [b, s, n, h]):  # fmt: skip
                return write, past, written, True  # computed per head (a rotary embedding): the rewrite merges them
        src = heads.inputs[0]
        if static_dims(src.shape) != [b, s, n * h]:
            return f"the head split reads shape {src.shape}, not [{b}, {s}, {n * h}]"
        return write, past, src, False

    @staticmethod
    def _slot(graph: Graph, indices: Tensor, bns: list[int]) -> Tensor | str:
        """The per-token slot t ([B, 1, S, 1]) of indices I[b, h, i] = (b, h, t[b, i])."""
        b, n, s = bns
        concat = graph.producer(indices)
        if (not is_onnx_op(concat, "Concat") or int(concat.attrs.get("axis", 0)) not in (-1, 3) or len(concat.inputs) != 3
                or static_dims(indices.shape) != [b, n, s, 3]):  # fmt: skip
            return f"the scatter indices are not a Concat of (row, head, slot) of shape [B, N, {s}, 3]"
        grids = np.meshgrid(np.arange(b), np.arange(n), np.arange(s), indexing="ij")[:2]
        for part, grid in zip(concat.inputs[:2], grids):
            value = graph.const_value(part)
            if value is None or value.size != b * n * s or not np.array_equal(value.reshape(b, n, s), grid):
                return "the row and head indices are not the constant grids of a write per row, head and token"
        slot = concat.inputs[2]
        if is_onnx_op(expand := graph.producer(slot), "Expand"):
            slot = expand.inputs[0]
        if static_dims(slot.shape) != [b, 1, s, 1]:
            return "the slot index is not one value per token (expanded over the heads)"
        return slot

    @staticmethod
    def _mask_positions(graph: Graph, mask: Tensor, b: int, s: int) -> tuple[Tensor, int] | str:
        """(p ([B, 1, S, 1]), C) of the mask M[b, 0, i, j] = 0 if j <= p[b, i] else hidden, j < C."""
        dims = static_dims(mask.shape, 4)
        where = match(graph, MASK, mask)
        if dims is None or dims[:3] != [b, 1, s] or isinstance(where, Miss) and where.depth == 0:
            return f"the attention bias is not a Where of shape [{b}, 1, {s}, C]"
        if isinstance(where, Miss):
            return where.reason
        ctx = dims[3]
        if np.any(where.value("shown") != 0) or np.any(where.value("hidden") > MASK_VALUE):
            return _NOT_ZERO_OR_HIDDEN
        compare = match(graph, SHOWN_SLOTS, where.tensor("visible"))
        if isinstance(compare, Miss):
            return compare.reason
        slots = compare.value("slots")
        if slots.size != ctx or slots.shape[-1] != ctx or not np.array_equal(slots.reshape(-1), np.arange(ctx)):
            return _NOT_ARANGE
        pos = compare.tensor("pos")
        if static_dims(pos.shape) != [b, 1, s, 1]:
            return f"the mask's positions have shape {pos.shape}, not [{b}, 1, {s}, 1]"
        return pos, ctx

    def rewrite(self, graph: Graph, m: DecodeAttentionMatch) -> None:
        mha, key_write, value_write = m.attention, m.key_write, m.value_write
        b = m.batch
        self._chunks += m.tokens > 1
        key = m.positions if m.tokens > 1 else m.slot
        seqlens = self._seqlens.get(id(key))
        if seqlens is None:
            last = key  # one token: its slot; a chunk: its first position + S - 1, the last slot it writes
            if m.tokens > 1:
                first = graph.add_node("Gather", [key, graph.constant(self.name, np.array([0], np.int64))], 1, {"axis": 1},
                                       prefix=self.name, before=mha).outputs[0]  # fmt: skip
                last = graph.add_node("Add", [first, graph.constant(self.name, np.array([m.tokens - 1], np.int64))], 1,
                                      prefix=self.name, before=mha).outputs[0]  # fmt: skip
            rows = graph.add_node("Reshape", [last, graph.constant(self.name, np.array([b], np.int64))], 1,
                                  prefix=self.name, before=mha).outputs[0]  # fmt: skip
            seqlens = graph.add_node("Cast", [rows], 1, {"to": TensorProto.INT32}, prefix=self.name, before=mha).outputs[0]
            self._seqlens[id(key)] = seqlens
        # [B, KV, S, H] -> [B, S, KV * H]
        k, v = (self._merge_heads(graph, t, m, mha) if split else t for t, split in zip((m.k, m.v), m.split_heads))
        total = graph.constant(self.name, np.array(m.ctx, np.int32))
        # Packed: GroupQueryAttention on separate q, k, v was slower than after a Concat (PERFORMANCE.md, row 21).
        packed = m.packed or graph.add_node("Concat", [m.q, k, v], 1, {"axis": -1}, prefix=self.name, before=mha).outputs[0]
        qkv = [packed, graph.omitted(), graph.omitted()]
        attrs: dict[str, int | float] = {"num_heads": m.heads, "kv_num_heads": m.kv_heads}
        if "scale" in mha.attrs:
            attrs["scale"] = float(mha.attrs["scale"])
        outs = [mha.outputs[0], key_write.outputs[0], value_write.outputs[0]]
        inputs = [*qkv, m.past_k, m.past_v, seqlens, total]
        graph.remove_nodes(m.nodes)
        graph.add_node("GroupQueryAttention", inputs, outs, attrs, prefix=self.name, domain=MS_DOMAIN, before=mha)

    def _merge_heads(self, graph: Graph, t: Tensor, m: DecodeAttentionMatch, before: Node) -> Tensor:
        """[B, KV, S, H] -> [B, S, KV * H] (one token: a Reshape, which moves nothing)."""
        if m.tokens > 1:
            t = graph.add_node("Transpose", [t], 1, {"perm": [0, 2, 1, 3]}, prefix=self.name, before=before).outputs[0]
        shape = graph.constant(self.name, np.array([m.batch, m.tokens, -1], np.int64))
        return graph.add_node("Reshape", [t, shape], 1, prefix=self.name, before=before).outputs[0]


def _kv_repeat(graph: Graph, t: Tensor, anchor: Node, bnch: list[int]) -> tuple[Tensor, int, list[Node]] | str:
    """(the cache [B, KV, C, H], KV, the repeat's nodes) of the key or value input ``t`` [B, N, C, H] of ``anchor``:
    ``t`` itself, or grouped-query attention's repeat of the KV heads, query head j reading KV head j // (N / KV):

        Reshape(Expand(Unsqueeze(cache, 2), [B, KV, N / KV, C, H]), [B, N, C, H])   (Unsqueeze or a Reshape)
    """
    b, n, ctx, h = bnch
    merge = graph.producer(t)
    expand = graph.producer(merge.inputs[0]) if is_onnx_op(merge, "Reshape") else None
    if not is_onnx_op(expand, "Expand"):
        return t, n, []
    dims = static_dims(expand.outputs[0].shape, 5)
    if dims is None or static_dims(t.shape) != [b, n, ctx, h] or dims[0] != b or dims[3:] != [ctx, h] or dims[1] * dims[2] != n:
        return f"the attention reads an Expand of shape {expand.outputs[0].shape}, not a repeat [B, KV, N / KV, C, H] of the KV heads"
    kv = dims[1]
    insert = graph.producer(expand.inputs[0])
    if not is_onnx_op(insert, "Unsqueeze", "Reshape") or static_dims(expand.inputs[0].shape) != [b, kv, 1, ctx, h]:
        return "the repeated KV heads are not the cache with an axis inserted at 2 ([B, KV, 1, C, H])"
    inside = (insert.outputs[0], expand.outputs[0], t)
    if not all(only_consumer(x, user) and not graph.is_graph_output(x) for x, user in zip(inside, (expand, merge, anchor))):
        return "the repeat of the KV heads is read outside the attention"
    return insert.inputs[0], kv, [insert, expand, merge]


def _identity_when_valid(graph: Graph, idx: Tensor, positions: Tensor | None, s: int) -> bool:
    """True if the gather indices ``idx`` provably pick token i at i wherever positions[0, i] >= 0 (one row of S).

    retain-kv-cache's padding copy: ``Where(p >= 0, [0, 1, ..., S-1], last)``, reshaped.
    """
    if positions is None:
        return False
    where = graph.producer(row_value(graph, idx, 1, s))
    if not is_onnx_op(where, "Where"):
        return False
    test = graph.producer(where.inputs[0])
    if not is_onnx_op(test, "GreaterOrEqual") or graph.scalar(test.inputs[1]) != 0:
        return False
    if row_value(graph, test.inputs[0], 1, s) is not positions:
        return False
    steps = graph.const_value(where.inputs[1])
    return steps is not None and steps.size == s and np.array_equal(steps.reshape(-1), np.arange(s))
