"""The cos/sin tables of a rotary embedding, computed by running the graph's own cos/sin subgraph.

A model computes cos and sin from its positions (``position_ids``) and
constants (``inv_freq``, a scaling factor, ...). Whatever the formula (plain
RoPE, rope_scaling ``linear`` or ``llama3``, an attention scaling factor), the
tables are what that subgraph gives for positions 0 .. n - 1, evaluated here
with the constant folder's kernels (:func:`passes.fold_kernels.run_kernel`)
instead of re-derived from a config.

:func:`rope_tables` finds the subgraph above cos and sin (every path must end
at a constant or at one integer tensor, the positions), feeds it the positions
(all in one row, taken if that agrees with one chunk in the positions' own
shape; else in chunks of that shape: a pinned decode graph's is [batch, 1]),
and checks what rotate-half RoPE needs:
each position's row depends on that position only (the rows agree when the
positions come in another order), the row is two copies of one half (cos(p *
f) for the frequencies f, concatenated twice), and cos and sin broadcast as
``[batch, 1, seq, head_dim]`` against ``[batch, heads, seq, head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from passes.const_values import const_value, default_domain
from passes.dtypes import tensor_dtype
from passes.fold_kernels import run_kernel
from passes.matching import describe_source
from qgraph.ir.graph import Graph, Node, Tensor

#: The most nodes a cos/sin subgraph may have (the exporters' take 5 to 20).
MAX_NODES = 64
#: Units in the last place two evaluations of one position may differ by.
ULPS = 4


@dataclass(frozen=True)
class RopeTables:
    """cos and sin for positions 0 .. n - 1, ``[n, half]`` each (half = head_dim / 2), and the positions tensor they read."""

    cos: np.ndarray
    sin: np.ndarray
    positions: Tensor


def _subgraph(graph: Graph, outputs: list[Tensor]) -> tuple[list[Node], dict[int, np.ndarray], list[Tensor]] | str:
    """The nodes above ``outputs`` (in graph order), the constants they read, and the other tensors they read; else why not."""
    nodes: dict[int, Node] = {}
    consts: dict[int, np.ndarray] = {}
    leaves: dict[int, Tensor] = {}
    todo = list(outputs)
    while todo:
        t = todo.pop()
        if id(t) in consts or id(t) in leaves or t.is_empty():
            continue
        value = const_value(graph, t)
        if value is not None:
            consts[id(t)] = value
            continue
        prod = graph.producer(t)
        if prod is None:
            leaves[id(t)] = t
            continue
        if id(prod) in nodes:
            continue
        if not default_domain(prod):
            return f"cos/sin are computed with the custom op {prod.domain}.{prod.op}"
        if any(isinstance(v, type(graph.gs)) for v in prod.attrs.values()):
            return f"cos/sin are computed with {prod.op} '{prod.name}', which has a subgraph"
        nodes[id(prod)] = prod
        if len(nodes) > MAX_NODES:
            return f"cos/sin are computed by more than {MAX_NODES} nodes"
        todo.extend(prod.inputs)
    return sorted(nodes.values(), key=graph.position), consts, list(leaves.values())


def _evaluate(graph: Graph, nodes: list[Node], consts: dict[int, np.ndarray], feeds: dict[int, np.ndarray],
              outputs: list[Tensor]) -> list[np.ndarray] | None:  # fmt: skip
    values = {**consts, **feeds}
    opset = graph.opset() or 1
    for node in nodes:
        ins = [None if t.is_empty() else values.get(id(t)) for t in node.inputs]
        if any(v is None and not t.is_empty() for v, t in zip(ins, node.inputs)):
            return None
        outs = run_kernel(node, ins, opset)
        if outs is None:
            return None
        values.update({id(t): v for t, v in zip(node.outputs, outs)})
    return [values[id(t)] for t in outputs]


def _table(graph: Graph, nodes: list[Node], consts: dict[int, np.ndarray], positions: Tensor, order: np.ndarray,
           cos: Tensor, sin: Tensor, head_dim: int, b: int, s: int) -> tuple[np.ndarray, np.ndarray] | str:  # fmt: skip
    """cos and sin rows ``[n, head_dim]`` for positions ``order`` (fed in chunks of [b, s]), row i for order[i]."""
    rows: list[list[np.ndarray]] = [[], []]
    for start in range(0, len(order), b * s):
        chunk = order[start : start + b * s]
        feed = np.zeros(b * s, np.int64)
        feed[: len(chunk)] = chunk
        got = _evaluate(graph, nodes, consts, {id(positions): feed.reshape(b, s)}, [cos, sin])
        if got is None:
            return "cos/sin could not be evaluated for the positions 0 .. n - 1 (an op the constant folder cannot run)"
        for i, (what, r) in enumerate(zip(("cos", "sin"), got)):
            if r.shape != (b, 1, s, head_dim):
                return f"{what} has shape {list(r.shape)} for positions of shape {[b, s]}, expected {[b, 1, s, head_dim]}"
            rows[i].append(r.reshape(b * s, head_dim)[: len(chunk)])
    return np.concatenate(rows[0]), np.concatenate(rows[1])


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a few units in the last place (an elementwise kernel may round a vector's tail differently)."""
    if a.shape != b.shape:
        return False
    scale = max(1.0, float(np.abs(a).max(initial=0.0)))
    return bool(np.allclose(a, b, rtol=0.0, atol=ULPS * float(np.finfo(a.dtype).eps) * scale))


def _consistent(forward: tuple[np.ndarray, np.ndarray], backward: tuple[np.ndarray, np.ndarray]) -> bool:
    return all(_same(f, r[::-1]) for f, r in zip(forward, backward))


def _tables(graph: Graph, nodes: list[Node], consts: dict[int, np.ndarray], positions: Tensor, cos: Tensor, sin: Tensor,
            head_dim: int, count: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | str:  # fmt: skip
    """The rows for positions 0 .. count - 1, and for them reversed; or why they cannot be computed."""
    shape = positions.shape or []
    rows, cols = (shape[0] if isinstance(shape[0], int) else 1), (shape[1] if isinstance(shape[1], int) else count)
    order = np.arange(count, dtype=np.int64)
    if (rows, cols) != (1, count):
        # All positions in one row: one evaluation instead of count / (batch * seq_len). Taken if its rows also
        # agree reversed and with one chunk in the graph's own shape (a subgraph that reads its shape differs).
        flat = _table(graph, nodes, consts, positions, order, cos, sin, head_dim, 1, count)
        back = _table(graph, nodes, consts, positions, order[::-1], cos, sin, head_dim, 1, count)
        tail = order[-min(rows * cols, count) :]
        probe = _table(graph, nodes, consts, positions, tail, cos, sin, head_dim, rows, cols)
        if not isinstance(flat, str) and not isinstance(back, str) and not isinstance(probe, str) and _consistent(flat, back):
            if all(_same(f[tail], p) for f, p in zip(flat, probe)):
                return flat, back
    forward = _table(graph, nodes, consts, positions, order, cos, sin, head_dim, rows, cols)
    if isinstance(forward, str):
        return forward
    backward = _table(graph, nodes, consts, positions, order[::-1], cos, sin, head_dim, rows, cols)
    if isinstance(backward, str):
        return backward
    return forward, backward


def rope_tables(graph: Graph, cos: Tensor, sin: Tensor, head_dim: int, count: int) -> RopeTables | str:
    """The tables of ``count`` positions behind ``cos`` and ``sin`` (``[batch, 1, seq, head_dim]``), or why not."""
    found = _subgraph(graph, [cos, sin])
    if isinstance(found, str):
        return found
    nodes, consts, leaves = found
    if len(leaves) != 1:
        names = ", ".join(f"'{t.name}'" for t in leaves) or "none"
        return f"cos/sin must be computed from one tensor of positions and constants; they read {names}"
    (positions,) = leaves
    if tensor_dtype(graph, positions) != TensorProto.INT64:
        return f"cos/sin are computed from '{positions.name}' ({describe_source(graph, positions)}), which is not an int64 tensor"
    if positions.shape is None or len(positions.shape) != 2:
        return f"the positions '{positions.name}' are not [batch, seq] (shape {positions.shape})"
    tables = _tables(graph, nodes, consts, positions, cos, sin, head_dim, count)
    if isinstance(tables, str):
        return tables
    forward, backward = tables
    half = head_dim // 2
    for what, a, r in zip(("cos", "sin"), forward, backward):
        if not _same(a, r[::-1]):
            return f"{what} of a position depends on more than that position (the rows differ when the positions come in another order)"
        if not _same(a[:, :half], a[:, half:]):
            return f"{what} is not two copies of one half along head_dim: not rotate-half RoPE"
    return RopeTables(np.ascontiguousarray(forward[0][:, :half]), np.ascontiguousarray(forward[1][:, :half]), positions)
