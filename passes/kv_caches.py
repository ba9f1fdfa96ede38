"""Find an export's growing KV caches and the attention each feeds (for retain-kv-cache).

A growing cache is a graph input that reaches (through Identity or one-input
Concat) a two-input Concat along the sequence axis whose result is a graph
output. Each cache is read by one attention, in either spelling:

* decomposed: keys feed the MatMul whose scores reach a Softmax, values the
  MatMul that reads that Softmax's probabilities;
* the standard ONNX ``Attention`` op (opset 23; dynamo writes it at opset 23
  and 24): keys are its input 1, values its input 2.

When a graph has no growing cache, :func:`why_no_cache` says what it has instead
(the sentence a user reads in the pass report).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qgraph.ir.contract import RETAINED_SUFFIX
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.ir.validate import is_onnx_op

# Ops between a cache and its attention MatMul that only move or scale data.
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Mul", "Div", "Cast", "Identity", "Unsqueeze", "Squeeze", "Expand"})
# Ops between the probabilities' Softmax and the value MatMul.
PROB_OPS = frozenset({"Where", "Cast", "Identity", "Dropout"})
#: The ONNX Attention op's inputs that take the keys and the values.
ATTENTION_ROLES = {1: "key", 2: "value"}


@dataclass
class Cache:
    """One growing cache and, once paired, the attention that reads it."""

    past: Tensor  # the graph input
    concat: Node  # the Concat that grows it
    new: Tensor  # this step's keys or values
    present: Tensor  # the Concat's output
    outputs: list[Tensor]  # graph outputs carrying it (the Concat output or Identity copies)
    role: str = ""
    matmul: Node | None = None  # the attention node that reads it: a MatMul, or an ONNX Attention
    softmax: Node | None = None  # what the key and the value of one attention share: its Softmax, or the Attention


def is_passthrough(node: Node) -> bool:
    return node.op == "Identity" or (node.op == "Concat" and len(node.inputs) == 1)


def find_caches(graph: Graph) -> list[Cache]:
    outputs = {id(t) for t in graph.outputs}
    caches = []
    for inp in graph.inputs:
        rank = len(inp.shape) if inp.shape is not None else None
        chain = [inp]
        for t in chain:  # grows while walking through pass-through nodes
            for node in t.outputs:
                if is_passthrough(node):
                    chain.append(node.outputs[0])
                elif node.op == "Concat" and len(node.inputs) == 2 and node.inputs[0] is t:
                    axis = int(node.attrs.get("axis", 0))
                    if rank is not None and axis % rank != rank - 2:
                        continue
                    present = node.outputs[0]
                    carried = [present] if id(present) in outputs else []
                    carried += [c.outputs[0] for c in present.outputs if c.op == "Identity" and id(c.outputs[0]) in outputs]
                    if carried:
                        caches.append(Cache(inp, node, node.inputs[1], present, carried))
    return caches


def first_reader(t: Tensor) -> tuple[Node, int] | None:
    """The first attention node reached from ``t`` through layout ops, and the input it reads:
    a MatMul reading it as input B (1), or an ONNX ``Attention`` (keys: 1, values: 2, see ATTENTION_ROLES)."""
    frontier, seen = [t], set()
    while frontier:
        x = frontier.pop(0)
        for node in x.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "MatMul" and node.inputs[1] is x:
                return node, 1
            if is_onnx_op(node, "Attention"):  # any input: retain-kv-cache names what it cannot take
                return node, next(i for i, y in enumerate(node.inputs) if y is x)
            if node.op in LAYOUT_OPS and node.inputs[0] is x:
                frontier.append(node.outputs[0])
    return None


def softmax_after(matmul: Node) -> Node | None:
    """The Softmax reached from the scores MatMul through mask and scale ops."""
    cur = matmul.outputs[0]
    for _ in range(16):
        if len(cur.outputs) != 1:
            return None
        node = cur.outputs[0]
        if node.op == "Softmax":
            return node
        if node.op not in ("Add", "Sub", "Where", "Mul", "Div", "Cast"):
            return None
        cur = node.outputs[0]
    return None


def softmax_before(matmul: Node) -> Node | None:
    """The Softmax whose probabilities the value MatMul reads (input A)."""
    t = matmul.inputs[0]
    for _ in range(8):
        node = t.inputs[0] if t.inputs else None
        if node is None:
            return None
        if node.op == "Softmax":
            return node
        if node.op not in PROB_OPS:
            return None
        # Where(IsNaN(p), 0, p): follow the data input that is not constant.
        data = [x for x in node.inputs[1:] if x.inputs and x.inputs[0].op != "Constant"] if node.op == "Where" else node.inputs[:1]
        if len(data) != 1:
            return None
        t = data[0]
    return None


def is_retained(graph: Graph) -> bool:
    """True if ``graph`` already follows the retained-state contract (its caches come back as ``*_RetainedState``)."""
    names = {t.name for t in graph.inputs}
    return any(t.name.endswith(RETAINED_SUFFIX) and t.name[: -len(RETAINED_SUFFIX)] in names for t in graph.outputs)


def why_no_cache(graph: Graph) -> str:
    """Why ``graph`` (in which :func:`find_caches` found nothing) has no growing KV cache, and what to do."""
    floats = [t for t in graph.inputs if t.dtype is not None and np.dtype(t.dtype).kind == "f" and t.shape is not None]
    combined = [t for t in floats if len(t.shape) == 5 and t.shape[0] == 2]
    if combined:
        return (
            f"input '{combined[0].name}' holds key and value in one tensor [2, batch, heads, past_len, head_dim] "
            "(ONNX Runtime's GPT-2 layout), which retain-kv-cache does not rewrite; export the model with separate "
            "past key and value inputs [batch, heads, past_len, head_dim] (qgraph export)"
        )
    if not [t for t in floats if len(t.shape) == 4]:
        return (
            "the graph has no KV cache inputs (an export without past key/values), so it cannot keep a cache between "
            "steps; export the model with its cache (qgraph export)"
        )
    return "no graph input is concatenated into a graph output along the sequence axis (no growing KV cache)"


# Integer ops through which an export computes shapes from a cache's length (``past_len + seq_len``, ...).
SHAPE_MATH_OPS = frozenset(
    {"Squeeze", "Unsqueeze", "Add", "Sub", "Mul", "Div", "Max", "Min", "Concat", "Reshape", "Cast", "Gather", "Slice", "Identity"}
)


def layout_nodes(t: Tensor, stop: Node) -> list[Node]:
    """The layout ops between ``t`` (a cache) and ``stop``, the attention node that reads it (e.g. GQA's
    repeat of the KV heads: Unsqueeze, Expand, Reshape)."""
    found: list[Node] = []
    frontier, seen = [t], set()
    while frontier:
        x = frontier.pop(0)
        for node in x.outputs:
            if node is stop or id(node) in seen or node.op not in LAYOUT_OPS or node.inputs[0] is not x:
                continue
            seen.add(id(node))
            found.append(node)
            frontier.append(node.outputs[0])
    return found


def only_shapes_of(t: Tensor, targets: set[int], live: set[int]) -> bool:
    """True if every live use of ``t`` (a number computed from a shape) ends, through integer shape math, as the
    shape input (not the data) of one of the nodes whose ids are ``targets``."""
    frontier, seen = [t], set()
    while frontier:
        x = frontier.pop()
        for node in x.outputs:
            if id(node) not in live:
                continue
            if id(node) in targets and node.inputs[0] is not x:
                continue
            if node.op not in SHAPE_MATH_OPS or id(node) in targets:
                return False
            if id(node) not in seen:
                seen.add(id(node))
                frontier.extend(node.outputs)
    return True
