"""Fold the rotary embeddings of q and k into their ``GroupQueryAttention`` (``do_rotary=1``), at a decode step and
in a prompt chunk (the ``cpu`` target's final slot, after fuse-decode-attention).

Before (fuse-rotary's and fuse-decode-attention's output; one token per row, q/k/v often one packed product):

    q, k, v = Split(qkv)                                          # when packed (pack-matmuls, Phi-3's qkv_proj)
    q' = RotaryEmbedding(q, cos, sin, Max(position_ids, 0))       # [B, 1, N * H], num_heads = N
    k' = RotaryEmbedding(k, cos, sin, Max(position_ids, 0))       # [B, 1, KV * H], num_heads = KV
    o, kc, vc = GroupQueryAttention(Concat(q', k', v), _, _, past_k, past_v, seqlens_k, total)

After:

    o, kc, vc = GroupQueryAttention(qkv, _, _, past_k, past_v, seqlens_k, total, cos, sin, do_rotary=1)

(a Concat of q, k and v instead of ``qkv`` when they are not one Split's outputs in that order). Per layer three to
four fewer kernels (two RotaryEmbedding, the Concat, the Split), as onnxruntime-genai's CPU graphs have it.

Why it is exact: for one token, GroupQueryAttention rotates q and k at position ``seqlens_k[b]`` (the slot the
token is written to), with the same cos/sin rows (``[positions, H / 2]``, not interleaved). fuse-decode-attention
proved that slot equals the position wherever the position is valid (p >= 0); the pass proves the rotary's
position input is the same position (through ``Max(p, 0)``, which fuse-rotary writes). A padding row (p = -1) is
rotated at its harmless slot instead of at 0: only its own output and that slot change, which nothing reads
before a token writes it (fuse-decode-attention's docstring).

A prompt chunk (one row of S tokens, fuse-decode-attention's prefill form) rotates the same way, with the
rotary's own positions given to the attention as its ``position_ids`` input: by itself GroupQueryAttention would
derive a chunk's positions from ``seqlens_k``, which a right-padded last chunk makes wrong (the padding's slots
count), while ``position_ids`` rotates token i at exactly the position the two RotaryEmbedding nodes used
(``Max(p, 0)``, padding included), so the chunk's outputs and cache writes do not change at all. Per layer of a
prefill the same three to four kernels fewer.

Declined, with a reason: a chunk in several rows, a head size that is not a multiple of 16 (the CPU kernel's
rotary refuses it at run time), an attention that rotates already or has no packed input, a Concat or rotary
read elsewhere, rotary embeddings that are not opset-23 ``RotaryEmbedding`` on the whole head, not rotate-half,
with different tables or positions for q and k, tables that are not constant ``[P, H / 2]``, head counts that
differ from the attention's, and positions not shown to be the slot's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from passes.constants import MS_DOMAIN
from passes.positions import equal_when_valid
from passes.shapes import static_dims, unit_transpose
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.ir.validate import is_onnx_op
from qgraph.pipeline.fusion import FusionPass, Match, only_consumer
from qgraph.pipeline.manager import PassResult

#: ONNX Runtime 1.32's CPU GroupQueryAttention rotates heads of a multiple of this many channels only (found by running it).
ROTARY_HEAD_MULTIPLE = 16
#: GroupQueryAttention's inputs up to total_sequence_length, and where cos_cache and sin_cache go.
_GQA_INPUTS = 7


@dataclass(kw_only=True)
class AttentionRotaryMatch(Match):
    """The attention, its Concat and the two rotary embeddings (and the Split, when packed: ``nodes``)."""

    attention: Node
    packed: Tensor | None  # the q/k/v product the Split reads, if the attention can take it whole
    q: Tensor
    k: Tensor
    v: Tensor
    cos: Tensor
    sin: Tensor
    positions: Tensor | None  # a chunk: the rotary's positions, the attention's position_ids input


class FuseAttentionRotary(FusionPass[AttentionRotaryMatch]):
    """RotaryEmbedding(q), RotaryEmbedding(k) -> GroupQueryAttention's own rotary (``do_rotary``)."""

    name = "fuse-attention-rotary"
    requires = ("decode_attention_fused", "rotary_fused")
    produces = ("attention_rotary_fused",)
    invalidates = ("no_dead_nodes",)
    anchors = ("GroupQueryAttention",)
    stat = "attention_rotary"

    def run(self, graph: Graph) -> PassResult:
        # fuse-decode-attention leaves the head splits after each rotary dead; they would read as other readers.
        before = graph.node_count()
        graph.cleanup()
        dead = before - graph.node_count()
        graph.infer_shapes_if_missing((n.inputs[0] for n in graph.nodes if n.op == "GroupQueryAttention" and n.inputs), self.name)
        result = super().run(graph)
        if dead:  # the graph changed even where nothing was fused: the report says so
            result = replace(result, modified=True, stats={**result.stats, "dead_nodes_removed": dead})
        return result

    def match(self, graph: Graph, anchor: Node) -> AttentionRotaryMatch | str:
        if anchor.domain != MS_DOMAIN:
            return "a GroupQueryAttention outside com.microsoft"
        if int(anchor.attrs.get("do_rotary", 0)):
            return "the attention rotates q and k already"
        ins = anchor.inputs
        if len(ins) != _GQA_INPUTS or any(t.name for t in ins[1:3]):
            return "the attention does not take q, k and v packed in one input, and no more than total_sequence_length"
        heads, kv = int(anchor.attrs.get("num_heads", 0)), int(anchor.attrs.get("kv_num_heads", 0))
        dims = static_dims(ins[0].shape, 3)
        if dims is None or heads <= 0 or kv <= 0 or dims[2] % (heads + 2 * kv):
            return f"the packed q/k/v has no static shape [B, S, (N + 2 KV) H] ({ins[0].shape})"
        chunk = dims[1] != 1
        if chunk and dims[0] != 1:
            return f"a chunk of {dims[1]} tokens in {dims[0]} rows (GroupQueryAttention takes a chunk in one row only)"
        h = dims[2] // (heads + 2 * kv)
        if h % ROTARY_HEAD_MULTIPLE:
            return f"the head size {h} is not a multiple of {ROTARY_HEAD_MULTIPLE}, which GroupQueryAttention's rotary needs"
        concat = graph.producer(ins[0])
        if not is_onnx_op(concat, "Concat") or len(concat.inputs) != 3 or int(concat.attrs.get("axis", 0)) not in (-1, 2):
            return "the packed q/k/v is not a Concat of q, k and v on the last axis"
        if not only_consumer(ins[0], anchor) or graph.is_graph_output(ins[0]):
            return "the packed q/k/v is read elsewhere"
        (rq, q_views), (rk, k_views) = (_through_views(graph, t, concat) for t in concat.inputs[:2])
        for role, rot, views, n in (("q", rq, q_views, heads), ("k", rk, k_views, kv)):
            why = _rotary_problem(graph, rot, views[-1] if views else concat, [dims[0], dims[1], n * h], n, h)
            if why is not None:
                return f"{role}: {why}"
        if any(a is not b for a, b in zip(rq.inputs[1:], rk.inputs[1:])):
            return "q and k are rotated with different tables or positions"
        cos, sin, positions = rq.inputs[1:4]
        b = dims[0]
        # One token rotates at its slot (seqlens_k); a chunk at the positions it is given (position_ids).
        if not chunk and not equal_when_valid(graph, _seqlens_slot(graph, ins[5]), _unclamped(graph, positions), b, b):
            return "the rotary's positions are not shown to be the slot GroupQueryAttention writes (seqlens_k)"
        if chunk and static_dims(positions.shape) != [1, dims[1]]:  # int64, as RotaryEmbedding takes them
            return f"the chunk's positions are not [1, {dims[1]}] ({positions.shape})"
        q, k, v = rq.inputs[0], rk.inputs[0], concat.inputs[2]
        split = graph.producer(q)
        packed = None
        nodes = [concat, rq, rk, *q_views, *k_views]
        if (is_onnx_op(split, "Split") and [id(t) for t in split.outputs] == [id(q), id(k), id(v)]
                and int(split.attrs.get("axis", 0)) in (-1, 2) and static_dims(split.inputs[0].shape) == dims
                and all(only_consumer(t, user) for t, user in ((q, rq), (k, rk), (v, concat)))):  # fmt: skip
            packed = split.inputs[0]
            nodes.append(split)
        return AttentionRotaryMatch(
            nodes=nodes, attention=anchor, packed=packed, q=q, k=k, v=v, cos=cos, sin=sin, positions=positions if chunk else None
        )

    def rewrite(self, graph: Graph, m: AttentionRotaryMatch) -> None:
        gqa = m.attention
        if m.packed is not None:
            qkv = m.packed
        else:
            qkv = graph.add_node("Concat", [m.q, m.k, m.v], 1, {"axis": -1}, prefix=self.name, before=gqa).outputs[0]
        inputs = [qkv, *gqa.inputs[1:_GQA_INPUTS], m.cos, m.sin, *([m.positions] if m.positions is not None else [])]
        attrs = {**gqa.attrs, "do_rotary": 1, "rotary_interleaved": 0}
        outs = list(gqa.outputs)
        gqa.outputs.clear()  # the outputs get the new node as their one producer
        graph.add_node("GroupQueryAttention", inputs, outs, attrs, prefix=self.name, domain=MS_DOMAIN, before=gqa)
        graph.remove_nodes([*m.nodes, gqa])


def _through_views(graph: Graph, t: Tensor, concat: Node) -> tuple[Node | None, list[Node]]:
    """The node that makes ``t`` seen through views that move no element (Reshape, a Transpose of size-1 axes), each
    read by the next alone, and those views (the Concat's side first). fuse-decode-attention writes a chunk's single
    KV head as Reshape, Transpose, Reshape back to the rotary's own layout."""
    views: list[Node] = []
    node, reader = graph.producer(t), concat
    while (is_onnx_op(node, "Reshape") or unit_transpose(node)) and only_consumer(node.outputs[0], reader):
        if graph.is_graph_output(node.outputs[0]):
            break
        views.append(node)
        node, reader = graph.producer(node.inputs[0]), node
    return node, views


def _rotary_problem(graph: Graph, rot: Node | None, reader: Node, dims: list[int], heads: int, h: int) -> str | None:
    """Why ``rot`` is not a whole-head, rotate-half RotaryEmbedding of ``dims`` ([B, S, heads * h]) read by ``reader``
    alone."""
    if not is_onnx_op(rot, "RotaryEmbedding") or len(rot.inputs) != 4:
        return "not rotated by an opset-23 RotaryEmbedding with positions"
    if not only_consumer(rot.outputs[0], reader) or graph.is_graph_output(rot.outputs[0]):
        return "the rotated tensor is read elsewhere"
    if static_dims(rot.inputs[0].shape) != dims:
        return f"the rotated tensor is not {dims} ({rot.inputs[0].shape})"
    if int(rot.attrs.get("interleaved", 0)):
        return "an interleaved rotary (GroupQueryAttention folds rotate-half here)"
    if int(rot.attrs.get("rotary_embedding_dim", 0)) not in (0, h):
        return f"a partial rotary ({rot.attrs['rotary_embedding_dim']} of {h} channels)"
    if int(rot.attrs.get("num_heads", 0)) != heads:
        return f"the rotary takes {rot.attrs.get('num_heads')} heads, the attention {heads}"
    for role, t in zip(("cos", "sin"), rot.inputs[1:3]):
        table = graph.const_value(t)
        if table is None or table.ndim != 2 or table.shape[1] != h // 2 or table.dtype != np.float32:
            return f"the {role} table is not a float32 constant [positions, {h // 2}]"
    pos = rot.inputs[3]
    if static_dims(pos.shape) is None or graph.producer(pos) is None and not any(pos is i for i in graph.inputs):
        return "the positions have no static shape"
    return None


def _seqlens_slot(graph: Graph, seqlens: Tensor) -> Tensor:
    """The slot seqlens_k was cast from (fuse-decode-attention writes ``Cast(Reshape(slot), int32)``)."""
    cast = graph.producer(seqlens)
    return cast.inputs[0] if is_onnx_op(cast, "Cast") else seqlens


def _unclamped(graph: Graph, t: Tensor) -> Tensor:
    """x for ``Max(x, 0)`` (x wherever x >= 0; fuse-rotary's positions), else ``t``."""
    prod = graph.producer(t)
    if is_onnx_op(prod, "Max") and len(prod.inputs) == 2 and graph.scalar(prod.inputs[1]) == 0:
        return prod.inputs[0]
    return t
