"""Retain the KV cache: a growing, concatenated cache becomes a fixed-size one.

Before: each layer's ``present = Concat(past, new, axis=-2)`` grows the cache by
``seq_len`` slots per step, and the attention mask comes from an
``attention_mask`` input (boolean GatherND, causal Range/compare/Where).

After (the retained-state contract in DESIGN.md):

* ``past_key.{i}`` / ``past_value.{i}`` are [batch, num_kv_heads, ctx_len, head_dim];
  the step's keys and values are written into them at ``position_ids`` with
  ``ScatterND`` (which every target lowers), and the updated caches are the
  outputs ``past_key.{i}_RetainedState`` / ``past_value.{i}_RetainedState``;
* the mask is built from ``position_ids``: slot k is visible to query q iff
  ``k <= position_ids[q]``, as an additive float mask (0 / -10000, fp16-safe)
  added to the attention scores just before each Softmax, or given as the mask
  of an ONNX ``Attention`` op (opset 23, what dynamo writes at ``--opset 23``
  and newer; ``is_causal`` is cleared, the position mask is causal); the old
  mask machinery and the ``attention_mask`` input are gone;
* ``logits`` is computed for the last valid position of each row only.

Padding (position -1) never changes a slot a valid position can see: a padding
token writes the same slot and the same values as its row's last valid token
(so duplicate scatter indices carry identical data), and a row with no valid
token writes into the last slot, which no query can see until a real token at
that position overwrites it in the same step.

The cache is found by structure, not by name (:mod:`passes.kv_caches`): a graph
input that reaches (through Identity or one-input Concat) a two-input Concat
along the sequence axis whose result is a graph output. Keys and values are
told apart by where they go: keys feed the MatMul whose scores reach a Softmax
(or an ``Attention``'s input K); values feed the MatMul that reads that
Softmax's probabilities (or its input V). Grouped KV heads keep their repeat
(Unsqueeze, Expand, Reshape) after the cache, which holds ``num_kv_heads``;
the shapes an export computes for it from the cache's length
(``past_len + seq_len``) are given ``ctx_len - seq_len`` for ``past_len``, and
any other use of that length is refused. An ``Attention`` that takes its own
past, ``nonpad_kv_seqlen``, 3-D inputs or a constant mask, or whose present or
scores outputs are used, is refused with the reason.

A graph with no growing cache (an export without one, ONNX Runtime's combined
``past_{i}`` [2, batch, heads, past_len, head_dim]) is left as it is; the pass
says why in its ``declined`` list and the report's notes, and the pipeline's
rewrite stage refuses the graph with that reason (``qgraph.pipeline.optimize``).
An already retained graph is left alone without a note.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from passes.constants import MASK_VALUE
from passes.kv_caches import (
    ATTENTION_ROLES,
    Cache,
    find_caches,
    first_reader,
    is_passthrough,
    is_retained,
    layout_nodes,
    only_shapes_of,
    softmax_after,
    softmax_before,
    why_no_cache,
)
from qgraph.errors import RewriteError
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.ir.structure import live_node_ids
from qgraph.pipeline.manager import Pass, PassResult
from qgraph.pipeline.options import check_at_least_one

log = logging.getLogger(__name__)


def _live_nodes(graph: Graph) -> set[int]:
    return live_node_ids(graph.outputs)


class RetainKvCache(Pass):
    """Turn the growing KV cache into the retained-state contract (module docstring)."""

    name = "retain-kv-cache"
    produces = ("kv_retained",)

    def __init__(self, *, ctx_len: int) -> None:
        # ctx_len comes resolved from the options (qgraph.pipeline.options); a direct caller gets the same rule.
        check_at_least_one("ctx_len", ctx_len)
        self.ctx_len = ctx_len
        self.declined: list[str] = []

    # -- helpers that emit version-correct ops ---------------------------------
    def _node(self, graph: Graph, op: str, inputs: list[Tensor], attrs: dict[str, Any] | None = None, *, before: Node) -> Tensor:
        return graph.add_node(op, inputs, 1, attrs, prefix=self.name, before=before).outputs[0]

    def _const(self, graph: Graph, value: Any, dtype: Any) -> Tensor:
        return graph.constant(self.name, np.asarray(value, dtype=dtype))

    def _unsqueeze(self, graph: Graph, x: Tensor, axes: list[int], before: Node) -> Tensor:
        if (graph.opset() or 0) >= 13:
            return self._node(graph, "Unsqueeze", [x, self._const(graph, axes, np.int64)], before=before)
        return self._node(graph, "Unsqueeze", [x], {"axes": axes}, before=before)

    def _reduce_max(self, graph: Graph, x: Tensor, axis: int, before: Node) -> Tensor:
        if (graph.opset() or 0) >= 18:
            return self._node(graph, "ReduceMax", [x, self._const(graph, [axis], np.int64)], {"keepdims": 1}, before=before)
        return self._node(graph, "ReduceMax", [x], {"axes": [axis], "keepdims": 1}, before=before)

    def _dim(self, graph: Graph, shape: Tensor, i: int, before: Node) -> Tensor:
        """Element i of a shape tensor, as a 1-element int64 tensor."""
        return self._node(graph, "Gather", [shape, self._const(graph, [i], np.int64)], {"axis": 0}, before=before)

    # -- the pass ----------------------------------------------------------------
    def run(self, graph: Graph) -> PassResult:
        self.declined = []
        if is_retained(graph):
            return PassResult(graph, False)  # already the contract: nothing to do, nothing to explain
        self._names = graph.tensors()
        caches = find_caches(graph)
        if not caches:
            # Not an error here: a user who names the passes gets the graph as it is, and why (the pipeline's
            # rewrite stage refuses it: qgraph.pipeline.optimize).
            self.declined.append(why_no_cache(graph))
            return PassResult(graph, False, {"declined": 1}, notes=tuple(self.declined))
        layers = self._pair(graph, caches)
        inputs = {t.name: t for t in graph.inputs}
        pos = inputs.get("position_ids")
        if pos is None:
            raise RewriteError("the graph has no 'position_ids' input; the retained-state contract derives positions and the mask from it")
        ids = inputs.get("input_ids")
        dtype = layers[0][0].past.dtype or np.float32
        first = graph.nodes[0]
        shared = self._shared(graph, pos, layers[0][0].past, dtype, first)

        for i, (key, value) in enumerate(layers):
            for cache, role in ((key, "key"), (value, "value")):
                self._retain(graph, cache, shared)
                self._rename_cache(graph, cache, f"past_{role}.{i}")
        removed = attention_ops = 0
        for key, _ in layers:
            assert key.matmul is not None and key.softmax is not None  # set by _pair
            if key.matmul.op == "Attention":
                attention_ops += self._mask_attention_op(graph, key.matmul, shared["mask"], dtype)
            else:
                removed += self._rewrite_mask(graph, key.matmul, key.softmax, shared["mask"])
        logits = self._last_position_logits(graph, layers, shared)
        # The contract's IO order: ids, positions, then the caches by layer.
        graph.gs.outputs = [logits] + [c.retained for pair in layers for c in pair]  # type: ignore[attr-defined]
        redirected = self._redirect_cache_lengths(graph, layers, shared["seq"])
        self._check_cache_length_unused(graph, layers, redirected)
        new_inputs = ([ids] if ids is not None else []) + [pos]
        new_inputs += [c.past for pair in layers for c in pair]
        dropped = [t for t in graph.inputs if not any(t is n for n in new_inputs)]
        for t in dropped:
            # Exporters read the batch size off any input; position_ids has it too.
            for node in list(t.outputs):
                if (_dims_read(graph, node, len(t.shape or [])) or {-1}) <= {0} and len(t.shape or []) >= 1:
                    node.inputs[0] = pos
        live = _live_nodes(graph)
        for t in dropped:
            users = [n.name for n in t.outputs if id(n) in live]
            if users:
                raise RewriteError(
                    f"input '{t.name}' is still used by {users[:5]} after the rewrite; this graph's attention is not one retain-kv-cache understands"
                )
        # The replaced machinery (old mask, cache concats) reads inputs that are
        # gone now; drop it here so the graph stays valid between passes.
        graph.remove_nodes([n for n in graph.nodes if id(n) not in live])
        graph.gs.inputs = new_inputs
        stats = {"layers": len(layers), "caches": 2 * len(layers), "mask_ops_removed": removed, "ctx_len": self.ctx_len}
        if attention_ops:
            stats["attention_ops"] = attention_ops
        return PassResult(graph, True, stats)

    def _pair(self, graph: Graph, caches: list[Cache]) -> list[tuple[Cache, Cache]]:
        by_softmax: dict[int, dict[str, Cache]] = {}
        order: dict[int, int] = {id(n): i for i, n in enumerate(graph.nodes)}
        for c in caches:
            found = first_reader(c.present)
            if found is None:
                raise RewriteError(f"cache '{c.past.name}' reaches no attention (a MatMul or an ONNX Attention op)")
            mm, index = found
            if mm.op == "Attention":
                self._check_attention_op(graph, mm, c, index)
                c.role, sm = ATTENTION_ROLES[index], mm
            elif (sm := softmax_after(mm)) is not None:
                c.role = "key"
            else:
                sm = softmax_before(mm)
                if sm is None:
                    raise RewriteError(f"cache '{c.past.name}' feeds MatMul '{mm.name}', which is neither a scores nor a values MatMul")
                c.role = "value"
            c.softmax = sm
            c.matmul = mm
            slot = by_softmax.setdefault(id(sm), {})
            if c.role in slot:
                raise RewriteError(f"two {c.role} caches ('{slot[c.role].past.name}', '{c.past.name}') feed one attention")
            slot[c.role] = c
        layers = []
        for slot in by_softmax.values():
            if set(slot) != {"key", "value"}:
                raise RewriteError(f"attention with only a {next(iter(slot))} cache ('{next(iter(slot.values())).past.name}')")
            layers.append((slot["key"], slot["value"]))
        layers.sort(key=lambda kv: order[id(kv[0].matmul)])
        return layers

    @staticmethod
    def _check_attention_op(graph: Graph, node: Node, c: Cache, index: int) -> None:
        """Refuse, before anything changes, an ONNX Attention whose cache or mask this pass cannot take over."""
        where = f"Attention '{node.name}' (reading cache '{c.past.name}')"
        named = [i for i, t in enumerate(node.inputs) if t.name]
        if 4 in named or 5 in named or index not in ATTENTION_ROLES:
            raise RewriteError(f"{where} takes its own past_key/past_value; retain-kv-cache rewrites caches grown by a Concat only")
        if 6 in named:
            raise RewriteError(f"{where} takes nonpad_kv_seqlen, which would hide slots of the retained cache")
        for t in node.outputs[1:]:
            if t.name and (t.outputs or graph.is_graph_output(t)):
                raise RewriteError(f"{where} uses output '{t.name}' (its present key/value or scores); only its result can be kept")
        if any(t.shape is not None and len(t.shape) != 4 for t in node.inputs[:3]):
            raise RewriteError(f"{where} takes 3-D inputs [batch, seq, heads * head_dim]; retain-kv-cache needs 4-D ones")
        if 3 in named and _is_static(graph, node.inputs[3]):
            raise RewriteError(f"{where} has a constant mask (a bias?), which the position mask would replace")

    def _mask_attention_op(self, graph: Graph, node: Node, mask: Tensor, dtype: Any) -> int:
        """Attention(q, k, v, old mask, is_causal) -> Attention(q, k, v, position mask): the position mask is
        causal already, and additive float (QNN rejects a bool mask); softcap, if any, applies before it, as before."""
        q_dtype = node.inputs[0].dtype
        if q_dtype is not None and np.dtype(q_dtype) != np.dtype(dtype):  # the mask has the query's type
            mask = self._node(graph, "Cast", [mask], {"to": _onnx_dtype(q_dtype)}, before=node)
        while len(node.inputs) < 4:
            node.inputs.append(graph.omitted())
        node.inputs[3] = mask
        node.attrs["is_causal"] = 0
        return 1

    def _shared(self, graph: Graph, pos: Tensor, past: Tensor, dtype: Any, first: Node) -> dict[str, Tensor]:
        """Nodes every layer shares: the mask, the scatter indices, the last position."""
        ctx = self.ctx_len
        n = dict(before=first)
        # mask[b, 0, q, k] = 0 if k <= pos[b, q] else MASK_VALUE
        slots = self._const(graph, np.arange(ctx).reshape(1, 1, 1, ctx), np.int64)
        pos4 = self._unsqueeze(graph, pos, [1, 3], **n)
        visible = self._node(graph, "LessOrEqual", [slots, pos4], **n)
        mask = self._node(graph, "Where", [visible, self._const(graph, 0.0, dtype), self._const(graph, MASK_VALUE, dtype)], **n)
        # Scatter targets: padding copies its row's last valid token; an all-padding row writes the last slot.
        zero = self._const(graph, 0, np.int64)
        valid = self._node(graph, "GreaterOrEqual", [pos, zero], **n)
        maxpos = self._reduce_max(graph, pos, 1, **n)
        last = self._node(graph, "ArgMax", [pos], {"axis": 1, "keepdims": 1}, **n)
        target = self._node(graph, "Where", [valid, pos, maxpos], **n)
        target = self._node(
            graph, "Where", [self._node(graph, "Less", [target, zero], **n), self._const(graph, ctx - 1, np.int64), target], **n
        )
        pos_shape = self._node(graph, "Shape", [pos], **n)
        batch, seq = self._dim(graph, pos_shape, 0, **n), self._dim(graph, pos_shape, 1, **n)
        one = self._const(graph, 1, np.int64)
        seq_range = self._node(
            graph, "Range", [zero, self._node(graph, "Squeeze", [seq, self._const(graph, [0], np.int64)], **n), one], **n
        )
        src = self._node(graph, "Where", [valid, self._unsqueeze(graph, seq_range, [0], **n), last], **n)
        # indices[b, h, s] = (b, h, target[b, s])
        heads = past.shape[1] if past.shape is not None and isinstance(past.shape[1], int) else None
        if heads is None:
            raise RewriteError(f"the number of heads of '{past.name}' (dim 1) is not a number; pin it before retain-kv-cache")
        batch_range = self._node(
            graph, "Range", [zero, self._node(graph, "Squeeze", [batch, self._const(graph, [0], np.int64)], **n), one], **n
        )
        b_idx = self._node(graph, "Reshape", [batch_range, self._const(graph, [-1, 1, 1, 1], np.int64)], **n)
        h_idx = self._const(graph, np.arange(heads).reshape(1, heads, 1, 1), np.int64)
        t_idx = self._unsqueeze(graph, target, [1, 3], **n)
        full = self._node(
            graph, "Concat", [batch, self._const(graph, [heads], np.int64), seq, self._const(graph, [1], np.int64)], {"axis": 0}, **n
        )
        parts = [self._node(graph, "Expand", [x, full], **n) for x in (b_idx, h_idx, t_idx)]
        indices = self._node(graph, "Concat", parts, {"axis": -1}, **n)
        is_last = self._node(graph, "Equal", [pos, maxpos], **n)
        return {"mask": mask, "indices": indices, "seq": seq, "src": self._unsqueeze(graph, src, [1, 3], **n), "is_last": is_last}

    def _retain(self, graph: Graph, c: Cache, shared: dict[str, Tensor]) -> None:
        # retained = ScatterND(past, indices, new[with padding rows copied from the last valid token])
        at = c.concat
        src = self._node(graph, "Expand", [shared["src"], self._node(graph, "Shape", [c.new], before=at)], before=at)
        values = self._node(graph, "GatherElements", [c.new, src], {"axis": 2}, before=at)
        retained = self._node(graph, "ScatterND", [c.past, shared["indices"], values], before=at)
        graph.replace_uses(c.present, retained)
        for out in c.outputs:
            graph.replace_uses(out, retained)
        c.retained = retained  # type: ignore[attr-defined]

    def _rename_cache(self, graph: Graph, c: Cache, name: str) -> None:
        past, retained = c.past, c.retained  # type: ignore[attr-defined]
        shape = list(past.shape) if past.shape is not None else ["batch", None, None, None]
        shape[2] = self.ctx_len
        _claim_name(graph, self._names, past, name)
        _claim_name(graph, self._names, retained, f"{name}_RetainedState")
        past.shape = shape
        retained.dtype, retained.shape = past.dtype, list(shape)

    def _rewrite_mask(self, graph: Graph, matmul: Node, softmax: Node, mask: Tensor) -> int:
        """Drop the old mask ops between the scores and the Softmax; add ours."""
        removed = 0
        cur = matmul.outputs[0]
        while True:
            node = cur.outputs[0]
            if node is softmax:
                break
            other = [x for x in node.inputs if x is not cur]
            constant = all(graph.is_constant(x) for x in other)
            if (node.op == "Where" and any(x is cur for x in node.inputs[1:])) or (node.op in ("Add", "Sub") and not constant):
                # The old mask (a select, or an additive bias): bypass it.
                graph.replace_uses(node.outputs[0], cur)
                graph.remove_nodes([node])
                removed += 1
            elif node.op in ("Mul", "Div", "Cast", "Add", "Sub"):
                cur = node.outputs[0]  # scaling stays
            else:
                raise RewriteError(f"unexpected {node.op} '{node.name}' between attention scores and Softmax '{softmax.name}'")
        masked = self._node(graph, "Add", [cur, mask], before=softmax)
        softmax.inputs[0] = masked
        # SDPA exports guard fully masked rows: Where(IsNaN(p), 0, p). The new
        # mask is finite, so no row is ever all -inf and the guard can go.
        probs = softmax.outputs[0]
        for node in list(probs.outputs):
            guard = node.outputs[0].outputs[0] if node.op == "IsNaN" and len(node.outputs[0].outputs) == 1 else None
            if guard is not None and guard.op == "Where" and guard.inputs[0] is node.outputs[0] and guard.inputs[2] is probs:
                graph.replace_uses(guard.outputs[0], probs)
                removed += 1
        return removed

    def _redirect_cache_lengths(self, graph: Graph, layers: list[tuple[Cache, Cache]], seq: Tensor) -> set[int]:
        """Shapes an export computes from the growing cache's length (``past_len + seq_len``, e.g. dynamo's for GQA's
        repeat of the KV heads after the cache) now describe the retained cache: ``past_len`` becomes
        ``ctx_len - seq_len``, used only as the shape input of the layout ops between a cache and its attention.
        Returns the ids of the Shape nodes it adds, which read the retained cache's length, ctx_len."""
        added: set[int] = set()
        live = _live_nodes(graph)
        repeat = {id(n) for pair in layers for c in pair for n in layout_nodes(c.retained, c.matmul)}  # type: ignore[attr-defined]
        for pair in layers:
            for c in pair:
                rank = len(c.past.shape or [])
                chain = [c.past]
                for t in chain:
                    for node in list(t.outputs):
                        if is_passthrough(node):
                            chain.append(node.outputs[0])
                            continue
                        dims = _dims_read(graph, node, rank)
                        if node.op != "Shape" or id(node) not in live or rank != 4 or dims is None or 2 not in dims:
                            continue
                        if not only_shapes_of(node.outputs[0], repeat, live):
                            continue  # _check_cache_length_unused names it
                        # past_len -> ctx_len - seq_len (the step's length): past_len + seq_len is the retained length
                        at = dict(before=node)
                        full = self._node(graph, "Shape", [c.past], **at)
                        added.add(id(graph.producer(full)))
                        step = self._node(graph, "Mul", [seq, self._const(graph, [0, 0, 1, 0], np.int64)], **at)  # [0, 0, seq_len, 0]
                        length = self._node(graph, "Sub", [full, step], **at)
                        start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
                        if start != 0 or end is not None:
                            bounds = [self._const(graph, [v], np.int64) for v in (start, rank if end is None else int(end))]
                            length = self._node(graph, "Slice", [length, *bounds], **at)
                        graph.replace_uses(node.outputs[0], length)
        return added

    def _check_cache_length_unused(self, graph: Graph, layers: list[tuple[Cache, Cache]], redirected: set[int]) -> None:
        """Nothing live may still read the old cache (e.g. its length, which is ctx_len now)."""
        live = _live_nodes(graph)
        for pair in layers:
            for c in pair:
                chain = [c.past]
                for t in chain:
                    for node in t.outputs:
                        if is_passthrough(node):
                            chain.append(node.outputs[0])
                        elif (
                            id(node) in live
                            and id(node) not in redirected
                            and node.op != "ScatterND"
                            and 2 in (_dims_read(graph, node, 4) or {2})
                        ):
                            raise RewriteError(
                                f"'{node.name}' ({node.op}) still reads the growing cache '{c.past.name}' after the rewrite; "
                                "retain-kv-cache cannot tell what it computes"
                            )

    def _last_position_logits(self, graph: Graph, layers: list[tuple[Cache, Cache]], shared: dict[str, Tensor]) -> Tensor:
        cache_outputs = {id(c.retained) for pair in layers for c in pair}  # type: ignore[attr-defined]
        rest = [t for t in graph.outputs if id(t) not in cache_outputs]
        if len(rest) != 1:
            raise RewriteError(f"expected one logits output besides the caches, found {[t.name for t in rest]}")
        logits = rest[0]
        producer = logits.inputs[0] if logits.inputs else None
        # logits[b, 0] = onehot(last valid position) @ hidden[b]: exact, and the
        # vocabulary projection then runs for one position only.
        dtype = layers[0][0].past.dtype or np.float32
        if producer is not None and producer.op == "MatMul" and _is_static(graph, producer.inputs[1]):
            sel = self._selector(graph, shared, dtype, producer)
            producer.inputs[0] = self._node(graph, "MatMul", [sel, producer.inputs[0]], before=producer)
            out = logits
        else:
            anchor = graph.nodes[-1]
            sel = self._selector(graph, shared, dtype, anchor)
            out = graph.add_node("MatMul", [sel, logits], 1, prefix=self.name, after=anchor).outputs[0]
            out.dtype = logits.dtype
            _claim_name(graph, self._names, logits, graph.fresh_name(self.name))
        _claim_name(graph, self._names, out, "logits")
        vocab = logits.shape[-1] if logits.shape else None
        batch = layers[0][0].past.shape[0] if layers[0][0].past.shape else "batch"
        out.shape = [batch, 1, vocab]
        return out

    def _selector(self, graph: Graph, shared: dict[str, Tensor], dtype: Any, before: Node) -> Tensor:
        onehot = self._node(graph, "Cast", [shared["is_last"]], {"to": _onnx_dtype(dtype)}, before=before)
        return self._unsqueeze(graph, onehot, [1], before)


def _is_static(graph: Graph, t: Tensor) -> bool:
    """True if ``t`` depends on no graph input (a weight, or e.g. a Transpose of one)."""
    stack, seen = [t], set()
    while stack:
        x = stack.pop()
        if id(x) in seen or graph.is_constant(x):
            continue
        seen.add(id(x))
        if not x.inputs:
            return False  # a graph input
        stack.extend(x.inputs[0].inputs)
    return True


def _dims_read(graph: Graph, node: Node, rank: int) -> set[int] | None:
    """The dims of its input a Shape node's live uses can see; None if not a Shape or unknown."""
    if node.op != "Shape":
        return None
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    dims = list(range(rank))[start : None if end is None else int(end)]
    if start != 0 or end is not None:
        return set(dims)
    seen: set[int] = set()
    for user in node.outputs[0].outputs:  # a full Shape: every use must pick constant dims
        idx = graph.const_value(user.inputs[1]) if user.op == "Gather" and len(user.inputs) > 1 else None
        if idx is None:
            return None
        seen |= {dims[int(i)] for i in np.ravel(idx)}
    return seen


def _onnx_dtype(dtype: Any) -> int:
    from onnx import helper

    return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def _claim_name(graph: Graph, names: dict[str, Tensor], tensor: Tensor, name: str) -> None:
    """Give ``tensor`` the name ``name``, renaming any other tensor that has it.

    ``names`` is the pass's name map; tensors it creates have fresh names, so
    only the original tensors can collide.
    """
    if tensor.name == name:
        return
    other = names.get(name)
    if other is not None and other is not tensor:
        other.name = graph.fresh_name(name)
        names[other.name] = other
    names.pop(tensor.name, None)
    tensor.name = name
    names[name] = tensor
