"""Fuse scaled dot-product attention into ONNX Runtime's ``MultiHeadAttention``.

    # out = Softmax(Q @ K^T * scale + bias) @ V      Q [B, N, S, H], K and V [B, N, L, H]

becomes one ``com.microsoft.MultiHeadAttention`` node (query in [B, S, N*H],
key and value in [B, N, L, H] as they are, the additive bias as
``attention_bias``). This is ONNX Runtime's own contrib op, so the pass belongs
to the ``cpu`` target (its compile runs it after pinning the shapes); other
runtimes do not know the op. Measured on gpt2-small decode at ctx_len 128, the
attention of the 12 layers costs about 1 ms/token as MatMul + Softmax + MatMul
under weight streaming and about 0.3 ms as MultiHeadAttention (PERFORMANCE.md);
ONNX's opset-23 ``Attention`` was no faster than the decomposed form there.

Matched, from the Softmax (over the last axis):

* ``scores = MatMul(q, kt)``, optionally times or divided by a constant scalar,
  plus an optional additive bias (either operand order of the Add);
* ``q = Q``, optionally times a constant scalar;
* ``kt`` is K with its last two axes swapped, optionally times a constant
  scalar: ``Transpose(K, perm=[0, 1, 3, 2])``, or dynamo's
  ``Reshape(Transpose(Reshape(K, [B*N, L, H]), [0, 2, 1]), [B, N, H, L])``;
* the Softmax's only consumer is ``MatMul(probs, V)``.

The scalars multiply into MultiHeadAttention's ``scale``. Declined, with the
reason: another dtype than float32, ranks other than 4, head counts or sizes
that are not static numbers or differ between Q, K and V, a bias that does not
broadcast as ``[B or 1, N or 1, S, L]`` (MultiHeadAttention does not broadcast
the last two), an intermediate used outside the pattern, and custom-domain ops.

The standard ONNX ``Attention`` op (opset 23, what dynamo writes at opset 23
and 24, its mask made the additive position mask by retain-kv-cache) is the
same computation and becomes the same node, with its ``scale`` (default
1/sqrt(H)); grouped K/V heads (fewer than Q's, dividing them) are repeated for
it, ``Reshape(Expand(Unsqueeze(kv, 2)))``, the spelling fuse-decode-attention
takes back. Declined, with the reason, besides the above: a bool mask,
K/V heads that do not divide Q's, ``softcap``, ``is_causal``, a
softmax precision other than float32, its own past key/value, and a used
present or scores output. Measured on the opset-23 tiny GPT-2, the fused
graph is what the MatMul/Softmax spelling gives, so fuse-decode-attention
rewrites it the same way; an Attention op this pass declines runs as the
opset-23 op on ONNX Runtime's kernel.

When Q comes from ``Transpose(X, [0, 2, 1, 3])`` (the usual head split) the
query is X reshaped, and when the output's only use is the usual head merge
(``Transpose([0, 2, 1, 3])`` then a Reshape), the fused node writes the merged
tensor directly (through one Reshape when the merge asks for another static
shape than [B, S, N*H], such as [B*S, N*H]: 12 fewer kernels per Llama-shape
step); otherwise Transposes and Reshapes restore the layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from passes.constants import MS_DOMAIN, MS_VERSION
from passes.dtypes import dtype_name, tensor_dtype
from passes.matching import Role, leak, sole_consumer
from passes.pattern import Const, Found, Miss, Op, Or, Var, match
from passes.shapes import static_dims
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.ir.validate import is_onnx_op
from qgraph.pipeline.fusion import FusionPass, Match
from qgraph.pipeline.manager import PassResult

HEAD_PERM = [0, 2, 1, 3]

# u*c or u/c with a constant scalar c (c on either side of the Mul, the divisor of the Div)
SCALING = Or(
    Op("Mul", Const("c", scalar=True), Var("u", not_scalar=True), commute=True, name="scaling"),
    Op("Div", Var("u", not_scalar=True), Const("c", scalar=True), name="scaling"),
)
# Q @ K^T, or it times or divided by a constant scalar (either side)
SCORES = Or(Op("MatMul"), Op(("Mul", "Div"), Const("c", scalar=True), Op("MatMul"), commute=True))
# the scores and the additive bias, in either order
BIAS_ADD = Op("Add", Var("a"), Var("b"), name="add", role="the bias Add")
QK = Op("MatMul", Var("q"), Var("kt"), name="mm", role="the scores MatMul",
        why="the Softmax input does not come from Q @ K^T (it comes from {found})", missing="a graph input")  # fmt: skip


def _not_transposed_key(graph: Graph, kt: Tensor, prod: Node | None) -> str:
    if prod is None:
        return "the second operand of the scores MatMul is not a transposed key"
    return f"the second operand of the scores MatMul comes from {prod.op}, not from a transpose of the key"


# K^T: Transpose(K, [0, 1, 3, 2]), or dynamo's Reshape(Transpose(Reshape(K, [B*N, L, H]), [0, 2, 1]), [B, N, H, L])
KEY_T = Or(
    Op("Transpose", Var("key"), name="transpose", role="the key transpose"),
    Op("Reshape", Op("Transpose", Op("Reshape", Var("key"), role="the key reshape"), name="transpose", role="the key transpose"),
       role="the key reshape back", name="reshape",
       operands_why="the second operand of the scores MatMul is a Reshape, but not of a [0, 2, 1]-transposed 3-D key"),
    why=_not_transposed_key,
)  # fmt: skip


@dataclass(kw_only=True)
class AttentionMatch(Match):
    """An attention site: Q, K and V as MultiHeadAttention reads them, the bias, the output and the scale."""

    query: Tensor
    key: Tensor
    value: Tensor
    bias: Tensor | None
    bias_shape: list[int] | None  # the bias's shape padded to rank 4
    out: Tensor
    shape: tuple[int, int, int, int]  # B, N, S, H
    scale: float
    kv_heads: int = 0  # K/V heads of an ONNX Attention with grouped heads (0: as many as Q), repeated for MultiHeadAttention


def _scaled(graph: Graph, tensor: Tensor, roles: list[Role], what: str) -> tuple[Tensor, float]:
    """Follow ``tensor`` up through one ``Mul``/``Div`` by a constant scalar; returns (source, factor)."""
    found = match(graph, SCALING, tensor)
    if isinstance(found, Miss) or (found.node("scaling").op == "Div" and float(found.scalar("c")) == 0.0):
        return tensor, 1.0
    roles.append((f"the scaling of {what}", found.node("scaling")))
    value = float(found.scalar("c"))
    return found.tensor("u"), 1.0 / value if found.node("scaling").op == "Div" else value


def _is_scores(graph: Graph, tensor: Tensor) -> bool:
    """True if ``tensor`` is a MatMul's output, or one scaling of it by a constant scalar."""
    return isinstance(match(graph, SCORES, tensor), Found)


def _key_of(graph: Graph, kt: Tensor, roles: list[Role]) -> Tensor | str:
    """K, for a tensor that is K with its last two axes swapped."""
    found = match(graph, KEY_T, kt, post_order=True)
    if isinstance(found, Miss):
        return found.reason
    perm = list(found.node("transpose").attrs.get("perm", []))
    key = found.tensor("key")
    if "reshape" not in found.nodes:
        if perm != [0, 1, 3, 2]:
            return f"the key is transposed with perm {perm}, not [0, 1, 3, 2]"
        roles += found.roles
        return key
    if perm != [0, 2, 1]:
        return "the second operand of the scores MatMul is a Reshape, but not of a [0, 2, 1]-transposed 3-D key"
    tr = found.node("transpose")
    k_shape, out_shape = static_dims(key.shape, 4), static_dims(kt.shape, 4)
    if k_shape is None or out_shape is None:
        return "the key's shape is not static, so the Reshape-Transpose-Reshape cannot be told to be a transpose"
    b, n, length, h = k_shape
    if out_shape != [b, n, h, length] or static_dims(tr.inputs[0].shape, 3) != [b * n, length, h]:
        return f"the Reshape-Transpose-Reshape of the key {k_shape} gives {out_shape}, not its last two axes swapped"
    roles += found.roles
    return key


class FuseAttention(FusionPass[AttentionMatch]):
    """Softmax(Q K^T * s + bias) V -> ``com.microsoft.MultiHeadAttention`` (ONNX Runtime CPU)."""

    name = "fuse-attention"
    requires = ("static_shapes",)
    produces = ("attention_fused",)
    invalidates = ("no_dead_nodes",)
    anchors = ("Softmax", "Attention")
    stat = "attention"

    def prepare(self, graph: Graph) -> None:
        graph.import_domain(MS_DOMAIN, MS_VERSION)

    def run(self, graph: Graph) -> PassResult:
        wanted = [t for n in graph.nodes for t in (n.inputs[:1] if n.op == "Softmax" else n.inputs[:4] if n.op == "Attention" else [])]
        graph.infer_shapes_if_missing((t for t in wanted if t.name), self.name)
        return super().run(graph)

    def match(self, graph: Graph, anchor: Node) -> AttentionMatch | str:
        if anchor.op == "Attention":
            return self._match_attention_op(graph, anchor)
        # out = Softmax(Q @ K^T * scale + bias) @ V
        roles: list[Role] = [("the Softmax", anchor)]
        rank = len(anchor.inputs[0].shape) if anchor.inputs[0].shape is not None else None
        axis = int(anchor.attrs.get("axis", -1))
        if rank is None or rank != 4:
            return f"the Softmax input has {'unknown rank' if rank is None else f'rank {rank}'}, not 4 ([B, N, S, L])"
        if axis not in (-1, 3):
            return f"the Softmax is over axis {axis}, not the last"
        probs = anchor.outputs[0]
        out_mm = sole_consumer(graph, probs)
        if out_mm is None or out_mm.op != "MatMul" or out_mm.inputs[0] is not probs:
            return "the Softmax output is not used only as the first operand of a MatMul with V"
        roles.append(("the MatMul with V", out_mm))
        value, out = out_mm.inputs[1], out_mm.outputs[0]

        scores, bias = anchor.inputs[0], None
        if isinstance(added := match(graph, BIAS_ADD, scores), Found):
            # The scores are the operand that is (a scaling of) a MatMul; the other is the bias.
            a, c = added.tensor("a"), added.tensor("b")
            scores, bias = (c, a) if _is_scores(graph, c) and not _is_scores(graph, a) else (a, c)
            roles += added.roles
        scores, s_scale = _scaled(graph, scores, roles, "the scores")
        qk = match(graph, QK, scores)
        if isinstance(qk, Miss):
            return qk.reason
        roles += qk.roles
        query, q_scale = _scaled(graph, qk.tensor("q"), roles, "Q")
        kt, k_scale = _scaled(graph, qk.tensor("kt"), roles, "K^T")
        key = _key_of(graph, kt, roles)
        if isinstance(key, str):
            return key
        return self.check(graph, roles, query=query, key=key, value=value, bias=bias, out=out, scale=s_scale * q_scale * k_scale)

    def _match_attention_op(self, graph: Graph, anchor: Node) -> AttentionMatch | str:
        # Attention(Q, K, V, bias) = Softmax(Q @ K^T * scale + bias) @ V, when nothing else of the op is in use
        if not is_onnx_op(anchor, "Attention"):
            return "an Attention outside the ONNX domain"
        ins, attrs = anchor.inputs, anchor.attrs
        if any(t.name for t in ins[4:]) or any(t.name and (t.outputs or graph.is_graph_output(t)) for t in anchor.outputs[1:]):
            return "the Attention takes its own past key/value or uses its present or scores outputs"
        if int(attrs.get("is_causal", 0)):
            return "the Attention is causal (is_causal=1), which MultiHeadAttention does not compute the same way"
        if float(attrs.get("softcap", 0.0)):
            return f"the Attention has softcap {float(attrs['softcap'])}, which MultiHeadAttention does not apply"
        if int(attrs.get("softmax_precision", TensorProto.FLOAT)) != TensorProto.FLOAT:
            return "the Attention's softmax precision is not float32"
        query, key, value = ins[:3]
        bias = ins[3] if len(ins) > 3 and ins[3].name else None
        if bias is not None and tensor_dtype(graph, bias) == TensorProto.BOOL:
            return "the Attention mask is bool; MultiHeadAttention takes an additive float bias"
        q_shape, k_shape = static_dims(query.shape), static_dims(key.shape)
        kv_heads = 0
        if q_shape is not None and k_shape is not None and len(q_shape) == len(k_shape) == 4 and q_shape[1] != k_shape[1]:
            if q_shape[1] % k_shape[1]:
                return f"Q has {q_shape[1]} heads and K/V {k_shape[1]}, which do not divide them into groups"
            kv_heads = k_shape[1]  # grouped: query head j reads K/V head j // (N / KV), repeated for MultiHeadAttention
        if "scale" in attrs:
            scale = float(attrs["scale"])
        elif q_shape is not None and len(q_shape) == 4:
            scale = 1.0 / float(np.sqrt(q_shape[3]))  # the op's default
        else:
            return "Q needs a static 4-D shape [B, N, S, H] (run pin-static-shapes first)"
        return self.check(graph, [("the Attention", anchor)], query=query, key=key, value=value, bias=bias, out=anchor.outputs[0],
                          scale=scale, kv_heads=kv_heads)  # fmt: skip

    def check(self, graph: Graph, roles: list[Role], *, query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None, out: Tensor,
              scale: float, kv_heads: int = 0) -> AttentionMatch | str:  # fmt: skip
        """The site as a match if MultiHeadAttention can compute it (static shapes that agree, float32, a bias it
        broadcasts, nothing but the output leaving the pattern), else the reason."""
        q_shape, k_shape, v_shape = static_dims(query.shape, 4), static_dims(key.shape, 4), static_dims(value.shape, 4)
        if q_shape is None or k_shape is None or v_shape is None:
            return "Q, K and V need static 4-D shapes [B, N, S|L, H] (run pin-static-shapes first)"
        b, n, s, h = q_shape
        kv = kv_heads or n
        if k_shape[:2] != [b, kv] or v_shape[:2] != [b, kv] or k_shape[3] != h or v_shape[3] != h or v_shape[2] != k_shape[2]:
            return f"Q {q_shape}, K {k_shape} and V {v_shape} do not share batch, heads and head size"
        length = k_shape[2]
        for t, what in ((query, "Q"), (key, "K"), (value, "V")) + (((bias, "the bias"),) if bias is not None else ()):
            dt = tensor_dtype(graph, t)
            if dt != TensorProto.FLOAT:
                return f"{what} is {dtype_name(dt) if dt is not None else 'of unknown dtype'}; MultiHeadAttention on CPU is float32"
        bias_shape = None
        if bias is not None:
            bs = static_dims(bias.shape) if bias.shape is not None and len(bias.shape) <= 4 else None
            if bs is None:
                return "the bias has no static shape of rank 4 or less"
            bias_shape = [1] * (4 - len(bs)) + bs
            if bias_shape[0] not in (1, b) or bias_shape[1] not in (1, n) or bias_shape[2:] != [s, length]:
                return f"the bias {bias_shape} does not broadcast as [B or 1, N or 1, S, L] = [{b} or 1, {n} or 1, {s}, {length}]"
        if (problem := leak(graph, roles, out)) is not None:
            return problem
        inside = {id(t) for _, node in roles for t in node.outputs}
        for t, what in ((query, "Q"), (key, "K"), (value, "V"), (bias, "the bias")):
            if t is not None and id(t) in inside:
                return f"{what} is computed inside the attention pattern"
        return AttentionMatch(nodes=[node for _, node in roles], query=query, key=key, value=value, bias=bias, bias_shape=bias_shape,
                              out=out, shape=(b, n, s, h), scale=scale, kv_heads=kv_heads)  # fmt: skip

    def rewrite(self, graph: Graph, m: AttentionMatch) -> None:
        b, n, s, h = m.shape
        last = graph.last_of(m.nodes)
        prev = last

        def add(op: str, inputs: list[Tensor], outputs: list[Tensor] | int = 1, **attrs: object) -> Node:
            nonlocal prev
            prev = graph.add_node(op, inputs, outputs, attrs, prefix=self.name, domain=MS_DOMAIN if op == "MultiHeadAttention" else "",
                                  after=prev)  # fmt: skip
            return prev

        merged_shape = [b, s, n * h]
        # The query in [B, S, N*H]: the head split undone (a Reshape never reorders elements), or a Transpose.
        query = m.query
        prod = graph.producer(query)
        if is_onnx_op(prod, "Transpose") and list(prod.attrs.get("perm", [])) == HEAD_PERM:
            src = prod.inputs[0]
            while is_onnx_op(up := graph.producer(src), "Reshape"):
                src = up.inputs[0]
            if static_dims(src.shape, 3) != merged_shape:
                src = add("Reshape", [prod.inputs[0], graph.constant(self.name, np.array(merged_shape, np.int64))]).outputs[0]
            q_bsd = src
        else:
            t = add("Transpose", [query], perm=HEAD_PERM).outputs[0]
            q_bsd = add("Reshape", [t, graph.constant(self.name, np.array(merged_shape, np.int64))]).outputs[0]
        bias = m.bias
        if bias is not None and list(bias.shape) != m.bias_shape:
            bias = add("Reshape", [bias, graph.constant(self.name, np.array(m.bias_shape, np.int64))]).outputs[0]
        key, value = m.key, m.value
        if m.kv_heads:
            # Reshape(Expand(Unsqueeze(kv, 2), [B, KV, N/KV, L, H]), [B, N, L, H]): fuse-decode-attention takes it back
            length = static_dims(key.shape, 4)[2]  # type: ignore[index]
            wide = graph.constant(self.name, np.array([b, m.kv_heads, n // m.kv_heads, length, h], np.int64))
            full = graph.constant(self.name, np.array([b, n, length, h], np.int64))
            key, value = (add("Reshape", [add("Expand", [add("Unsqueeze", [t, graph.constant(self.name, np.array([2], np.int64))]).outputs[0],
                                                          wide]).outputs[0], full]).outputs[0] for t in (key, value))  # fmt: skip
        inputs = [q_bsd, key, value] + ([graph.omitted(), graph.omitted(), bias] if bias is not None else [])
        attrs = {"num_heads": n, "scale": float(np.float32(m.scale))}
        out = m.out
        merge = self._head_merge(graph, out)
        if merge is not None:
            # Transpose([0, 2, 1, 3]) + Reshape of the output is a Reshape of the [B, S, N*H] result, or nothing when
            # that is the shape asked for (the attention writes it).
            transpose, reshape = merge
            merged = reshape.outputs[0]
            if static_dims(merged.shape, 3) == merged_shape:
                add("MultiHeadAttention", inputs, [merged], **attrs)
            else:
                o_bsd = add("MultiHeadAttention", inputs, 1, **attrs).outputs[0]
                static = graph.constant(self.name, np.array(merged.shape, np.int64))
                add("Reshape", [o_bsd, static], [merged])
            graph.remove_nodes([transpose, reshape])
        else:
            o_bsd = add("MultiHeadAttention", inputs, 1, **attrs).outputs[0]
            split = add("Reshape", [o_bsd, graph.constant(self.name, np.array([b, s, n, h], np.int64))]).outputs[0]
            add("Transpose", [split], [out], perm=HEAD_PERM)
        graph.remove_nodes(m.nodes)

    @staticmethod
    def _head_merge(graph: Graph, out: Tensor) -> tuple[Node, Node] | None:
        """The head merge after attention, Transpose([0, 2, 1, 3]) then a Reshape to a static shape, if that is out's only use."""
        tr = sole_consumer(graph, out)
        if not is_onnx_op(tr, "Transpose") or list(tr.attrs.get("perm", [])) != HEAD_PERM:
            return None
        rs = sole_consumer(graph, tr.outputs[0])
        shape = rs.outputs[0].shape if rs is not None else None
        if not is_onnx_op(rs, "Reshape") or shape is None or static_dims(shape) is None:
            return None
        return tr, rs
