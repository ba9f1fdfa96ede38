"""Running a graph on the fixed inputs through the IO contract, and comparing it with the reference.

A graph is driven as its signature says (:mod:`qgraph.devtools.debug.inputs`):
a raw export step by step with its presents fed back, a retained-state graph
through :func:`qgraph.contract.teacher_forced_logits`, anything else once on
the generic feeds.

Logits are compared at the positions both graphs produce: (row, position)
pairs, so a raw stage is compared at every position and a retained stage at
the last position of each step. The top-1 token agrees when both graphs pick
the same token, or the reference scores the two tokens within ``2 * atol`` (a
tie, which numerical noise may break either way); so a disagreement always
exceeds ``atol`` too.

Memory. Only the reference logits are kept (rows x positions x vocab floats).
Each stage runs in a fresh ONNX Runtime session built from the serialized graph
without its weights; ORT reads external weights from the model's folder
(``session.model_external_initializers_file_folder_path``), so a large model is
never copied. The session is dropped before the next pass. Before the
graph is handed to ORT, nodes no output depends on are dropped and the nodes are
sorted (passes leave that to the cleanup stage), on the serialized copy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from qgraph.devtools.debug.inputs import FixedInputs, Signature, signature
from qgraph.devtools.golden import proto_toposort
from qgraph.errors import GraphCheckError
from qgraph.ir.contract import CacheSpec, teacher_forced_logits
from qgraph.ir.graph import Graph

_ORT_FOLDER_KEY = "session.model_external_initializers_file_folder_path"

#: (row, position) for a language model's logits; the output name for a generic graph.
Key = tuple[int, int] | str


def runnable_model(graph: Graph) -> onnx.ModelProto:
    """The graph as ORT gets it: dead nodes dropped, nodes sorted, no value_info.

    Passes leave dead nodes and order to the cleanup stage; a dead node may
    read a tensor a pass removed. Stale value_info shapes are dropped too (ORT
    infers its own).
    """
    model = graph.to_proto()
    g = model.graph
    nodes = proto_toposort(g)
    live = {o.name for o in g.output}
    keep = []
    for n in reversed(nodes):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(_node_reads(n))
    kept = list(reversed(keep))
    del g.node[:]
    g.node.extend(kept)
    del g.value_info[:]
    return model


def _node_reads(node: onnx.NodeProto) -> set[str]:
    names = set(node.input)
    for a in node.attribute:  # outer-scope names a subgraph reads
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for n in sub.node:
                names |= _node_reads(n)
    return names


class NotComparable(Exception):
    """The fixed inputs do not fit this graph (a reason, not a numerical failure)."""


class _Session:
    """One ONNX Runtime CPU session over a graph, weights read from the model's folder."""

    def __init__(self, graph: Graph, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if threads:
            so.intra_op_num_threads = threads
        if graph.base_dir is not None:
            so.add_session_config_entry(_ORT_FOLDER_KEY, str(graph.base_dir.resolve()))
        data = runnable_model(graph).SerializeToString()
        try:
            self.sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise GraphCheckError(f"onnxruntime cannot load the graph: {first_line(e)}") from None
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.runs = 0

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, arg in self.inputs.items():
            if name not in feeds:
                raise NotComparable(f"input '{name}' is not one the fixed inputs provide")
            shape = feeds[name].shape
            want = list(arg.shape or [])
            if len(want) != len(shape) or any(isinstance(w, int) and w != s for w, s in zip(want, shape)):
                raise NotComparable(f"input '{name}' is pinned to {want}; the fixed inputs feed {list(shape)}")
        self.runs += 1
        try:
            values = self.sess.run(self.outputs, {k: v for k, v in feeds.items() if k in self.inputs})
        except Exception as e:
            raise GraphCheckError(f"onnxruntime failed to run the graph: {first_line(e)}") from None
        return dict(zip(self.outputs, values))


def first_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _raw_logits(step: _Session, graph: Graph, sig: Signature, fixed: FixedInputs) -> dict[Key, np.ndarray]:
    ins = {t.name: t for t in graph.inputs}
    batch = fixed.batch
    rows = [p + c for p, c in zip(fixed.prompts, fixed.continuations)]
    out: dict[Key, np.ndarray] = {}

    def feeds(start: int, width: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        f = {"input_ids": np.asarray([r[start : start + width] for r in rows], np.int64)}
        if "attention_mask" in ins:
            dtype = np.dtype(ins["attention_mask"].dtype or np.int64)
            f["attention_mask"] = np.ones((batch, start + width), dtype)
        if "position_ids" in ins:
            f["position_ids"] = np.broadcast_to(np.arange(start, start + width, dtype=np.int64), (batch, width)).copy()
        return {**f, **past}

    def record(logits: np.ndarray, start: int) -> None:
        for b in range(batch):
            for j in range(logits.shape[1]):
                out[(b, start + j)] = np.asarray(logits[b, j], np.float32).copy()

    if not sig.pasts:  # no cache: the whole sequence at once
        res = step(feeds(0, len(rows[0]), {}))
        record(res[sig.logits], 0)
        return out
    seq = (ins["input_ids"].shape or [None, None])[1]
    past_len = (ins[sig.pasts[0]].shape or [None] * 4)[2]
    pinned = isinstance(seq, int) or isinstance(past_len, int)
    past = {}
    for name in sig.pasts:
        t = ins[name]
        length = int(past_len) if isinstance(past_len, int) else 0
        past[name] = np.zeros((batch, t.shape[1], length, t.shape[3]), np.dtype(t.dtype or np.float32))  # type: ignore[index]
    if pinned:
        return _pinned_raw_logits(step, ins, sig, rows, past, seq if isinstance(seq, int) else len(rows[0]))
    start, width = 0, fixed.prompt_len
    total = len(rows[0])
    while start < total:
        res = step(feeds(start, width, past))
        record(res[sig.logits], start)
        past = {p: res[q] for p, q in zip(sig.pasts, sig.presents)}
        start, width = start + width, 1
    return out


def _pinned_raw_logits(
    step: _Session, ins: dict[str, Any], sig: Signature, rows: list[list[int]], past: dict[str, np.ndarray], width: int
) -> dict[Key, np.ndarray]:
    """A raw graph with pinned shapes: one step of ``width`` tokens over a masked-out zero past.

    Only a graph whose attention_mask hides the past can be run this way; the
    tokens past the fixed inputs are padding, and only real positions count.
    """
    length = next(iter(past.values())).shape[2]
    if length and "attention_mask" not in ins:
        raise NotComparable("the past has a pinned length and there is no attention_mask to hide it")
    batch = len(rows)
    ids = np.zeros((batch, width), np.int64)
    for b, r in enumerate(rows):
        ids[b, : min(width, len(r))] = r[:width]
    f = {"input_ids": ids, **past}
    if "attention_mask" in ins:
        dtype = np.dtype(ins["attention_mask"].dtype or np.int64)
        f["attention_mask"] = np.concatenate([np.zeros((batch, length), dtype), np.ones((batch, width), dtype)], axis=1)
    if "position_ids" in ins:
        f["position_ids"] = np.broadcast_to(np.arange(width, dtype=np.int64), (batch, width)).copy()
    logits = step(f)[sig.logits]
    return {(b, j): np.asarray(logits[b, j], np.float32).copy() for b in range(batch) for j in range(min(width, len(rows[b])))}


def _retained_logits(step: _Session, graph: Graph, sig: Signature, fixed: FixedInputs) -> dict[Key, np.ndarray]:
    ins = {t.name: t for t in graph.inputs}
    shape = ins[sig.pasts[0]].shape or []
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise NotComparable(f"the cache '{sig.pasts[0]}' has shape {shape}; expected [batch, heads, ctx_len, head_dim] with numbers")
    ctx = int(shape[2])
    need = fixed.prompt_len + len(fixed.continuations[0])
    if ctx < need:
        raise NotComparable(f"the cache holds {ctx} tokens; the fixed inputs need {need}")
    cache = CacheSpec(list(sig.pasts), (fixed.batch, int(shape[1]), ctx, int(shape[3])), np.dtype(ins[sig.pasts[0]].dtype or np.float32))
    seq = (ins["input_ids"].shape or [None, None])[1]
    pinned = isinstance(seq, int)
    prefill_seq_len = int(seq) if pinned else fixed.prompt_len  # type: ignore[arg-type]

    def decode(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if pinned and prefill_seq_len > 1:
            # The pinned graph decodes one token padded to its width (position -1 = padding).
            ids = np.zeros((fixed.batch, prefill_seq_len), np.int64)
            pos = np.full((fixed.batch, prefill_seq_len), -1, np.int64)
            ids[:, :1], pos[:, :1] = feeds["input_ids"], feeds["position_ids"]
            feeds = {**feeds, "input_ids": ids, "position_ids": pos}
        return step(feeds)

    steps = teacher_forced_logits(step, decode, cache, fixed.prompts, fixed.continuations, prefill_seq_len)
    out: dict[Key, np.ndarray] = {}
    for b, row in enumerate(steps):
        for k, logits in enumerate(row):
            out[(b, fixed.prompt_len - 1 + k)] = np.asarray(logits, np.float32)
    return out


@dataclass
class Outputs:
    """What one graph produced on the fixed inputs."""

    kind: str  # "lm" or "generic"
    signature: str
    values: dict[Key, np.ndarray]
    runs: int = 0


def run_graph(graph: Graph, fixed: FixedInputs, *, threads: int | None = None) -> Outputs:
    """Run ``graph`` on the fixed inputs in a fresh session (dropped on return)."""
    sig = signature(graph)
    step = _Session(graph, threads)
    try:
        if fixed.kind == "generic":
            values: dict[Key, np.ndarray] = {k: np.asarray(v) for k, v in step(fixed.feeds).items()}
            return Outputs("generic", sig.kind, values, step.runs)
        if sig.kind == "raw":
            values = _raw_logits(step, graph, sig, fixed)
        elif sig.kind == "retained":
            values = _retained_logits(step, graph, sig, fixed)
        else:
            raise NotComparable(f"the graph is neither a raw export nor a retained-state graph ({sig.why_generic})")
        return Outputs("lm", sig.kind, values, step.runs)
    finally:
        del step


@dataclass
class Comparison:
    max_abs_diff: float | None
    top1_agrees: bool | None
    compared: int
    worst: str = ""


def compare(ref: Outputs, got: Outputs, atol: float) -> Comparison:
    """Largest |got - ref| over what both produce, and top-1 agreement (see the module docstring)."""
    if ref.kind != got.kind:
        raise NotComparable(f"a {got.kind} graph cannot be compared with a {ref.kind} reference")
    keys = [k for k in ref.values if k in got.values]
    if not keys:
        raise NotComparable("the graph produces nothing the reference does (no common positions or outputs)")
    worst, worst_key = -1.0, keys[0]
    agree = True
    for k in keys:
        r = np.asarray(ref.values[k], np.float64)
        g = np.asarray(got.values[k], np.float64)
        if r.shape != g.shape:
            raise NotComparable(f"{_key_text(k)}: shape {list(g.shape)}, the reference has {list(r.shape)}")
        d = np.abs(g - r)
        d[np.isnan(g) & np.isnan(r)] = 0.0
        d[np.isnan(d)] = math.inf
        m = float(d.max()) if d.size else 0.0
        if m > worst:
            worst, worst_key = m, k
        if ref.kind == "lm" and r.size:
            top = int(np.argmax(g))
            if not (top == int(np.argmax(r)) or r[top] >= np.nanmax(r) - 2 * atol):
                agree = False
    return Comparison(worst, agree if ref.kind == "lm" else None, len(keys), _key_text(worst_key))


def _key_text(k: Key) -> str:
    return f"row {k[0]} position {k[1]}" if isinstance(k, tuple) else f"output '{k}'"
