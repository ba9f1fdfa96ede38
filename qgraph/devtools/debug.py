"""Debugging passes: stage dumps, numerical bisection, near misses.

The model is TVM's pass instruments (dump the IR after every pass as
``NNN_<pass>``) and onnxscript's rewriter tracer (say why a rule did not
fire). :func:`debug_passes` runs a pipeline one pass at a time and, after
each pass:

* writes ``DIR/NNN_<pass>.onnxtxt`` (ONNX text with names kept; weights left
  out: large initializers and Constant nodes become typed graph inputs) and
  ``DIR/NNN_<pass>.json`` (what changed, by op type, and the pass's stats);
* runs the graph on ONNX Runtime's CPU provider with fixed inputs and compares
  its logits with the input graph's (the reference): the largest absolute
  difference and whether the top-1 token agrees;
* collects the pass's near misses (``near_misses``: candidates declined, with
  the reason the check gave).

The first pass whose difference exceeds ``atol`` (or whose graph no longer
runs) is the first bad pass. If it supports ``max_matches``
(:attr:`qgraph.Pass.supports_max_matches`), it is re-run on a copy of its input
graph with only its first k match sites, and a binary search over k names the
site whose rewrite breaks the numbers.

Fixed inputs. ``batch`` rows (the pinned batch size, else 2) of a
``prompt_len``-token prompt followed by ``decode_steps`` teacher-forced tokens,
drawn with a fixed seed below the vocabulary size (the logits' last dim). How a
graph is driven depends on its signature, so the comparison survives
``retain-kv-cache``:

* raw (``input_ids``, optional ``attention_mask``/``position_ids``, ``past*``
  inputs paired with the outputs after ``logits`` in order): a prefill of the
  whole prompt with an empty past, then one token per step, each step feeding
  the previous presents back as the past. Logits of every position. A raw
  graph with pinned shapes (pin-static-shapes before retain-kv-cache) runs
  once: its pinned ``seq_len`` tokens after a zero past that the
  attention_mask hides.
* retained (``past_*`` inputs with ``<name>_RetainedState`` outputs):
  :func:`qgraph.contract.teacher_forced_logits`, prefill in chunks of the
  graph's pinned ``seq_len`` (else the whole prompt), then decode. A graph
  pinned to ``seq_len`` S > 1 decodes with the token padded to width S
  (position -1 marks padding in the contract), so every stage runs at its own
  pinned shape without re-pinning. Such a step fills slots p .. p+S-1, as a
  prompt chunk does, so the fixed inputs stop S-1 tokens short of the cache's
  end (the chunk contract of fuse-decode-attention's rewrite). Logits of the
  last valid position of each step only.
* anything else (generic): every input gets fixed values (floats uniform in
  [0.5, 1.5), integers 0, symbolic dims 2) and every output is compared by
  name; there is no top-1 token.

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

import collections
import copy
import hashlib
import importlib.util
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from qgraph.devtools.golden import MAX_INLINE, proto_toposort
from qgraph.errors import GraphCheckError, PassError, QGraphError, UnknownPassError
from qgraph.ir.contract import RETAINED_SUFFIX, CacheSpec, teacher_forced_logits
from qgraph.ir.graph import Graph
from qgraph.pipeline.manager import Pass, PassResult, validate_order
from qgraph.pipeline.optimize import Options, build_passes, default_ctx_len, model_max_length, register_pass

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("debug_passes_out")
DEFAULT_ATOL = 1e-3
DEFAULT_BATCH = 2
PROMPT_LEN = 7
DECODE_STEPS = 3
#: Symbolic dims of a generic graph's inputs get this size.
GENERIC_DIM = 2
#: Near misses printed per pass in the table (the JSON has all of them).
NEAR_MISSES_SHOWN = 20
_ORT_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_DUMP_RE = re.compile(r"^\d{3}_.+\.(onnxtxt|json)$")

#: (row, position) for a language model's logits; the output name for a generic graph.
Key = tuple[int, int] | str
Progress = Callable[[str], None]


# ---------------------------------------------------------------- third-party passes
def load_pass_module(path: str | Path) -> list[type[Pass]]:
    """Import a Python file and register every :class:`qgraph.Pass` subclass it defines.

    Registered passes can be named in ``--passes`` (and :func:`build_passes`) by
    their ``name``. Classes without a ``name`` (abstract bases) and classes the
    file merely imports are skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise UnknownPassError(f"pass module {p} does not exist; give the path of a .py file that defines qgraph.Pass subclasses")
    mod_name = "qgraph_pass_module_" + hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(mod_name, p)
    if spec is None or spec.loader is None:
        raise UnknownPassError(f"pass module {p} cannot be imported; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PassError(f"pass module {p} failed to import: {type(e).__name__}: {first}") from None
    classes = [
        obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, Pass) and obj.__module__ == mod_name and obj.name
    ]
    if not classes:
        raise UnknownPassError(f"{p} defines no qgraph.Pass subclass with a name; subclass qgraph.Pass and set 'name'")
    for cls in classes:
        register_pass(cls)
        log.info("registered pass '%s' (%s) from %s", cls.name, cls.__name__, p)
    return classes


def make_passes(passes: Sequence[str | Pass] | None, opts: Options) -> list[Pass]:
    """Pass instances by name (``None``: the default pipeline) or as given."""
    if passes is None:
        return build_passes(None, opts)
    out: list[Pass] = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
            continue
        try:
            out.append(build_passes([p], opts)[0])
        except TypeError as e:
            raise UnknownPassError(f"pass '{p}' cannot be made without arguments ({e}); give its constructor defaults") from None
    return out


# ---------------------------------------------------------------- dumps
def _numel(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def weightless_text(graph: Graph) -> str:
    """The graph as ONNX text, names kept, without weights.

    Initializers and Constant nodes with more than ``MAX_INLINE`` elements (and
    every external initializer) become typed graph inputs; no external weight
    is read.
    """
    model = graph.to_proto()
    g = model.graph
    keep, big = [], []
    for t in g.initializer:
        if t.data_location == TensorProto.EXTERNAL or _numel(t.dims) > MAX_INLINE:
            big.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = []
    for n in g.node:
        value = next((a.t for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and value is not None and _numel(value.dims) > MAX_INLINE:
            big.append(helper.make_tensor_value_info(n.output[0], value.data_type, list(value.dims)))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    g.input.extend(big)
    return onnx.printer.to_text(model).rstrip() + "\n"


def _node_keys(graph: Graph) -> collections.Counter[tuple[str, str]]:
    # (op, name): survives passes that re-import the graph (new node objects).
    return collections.Counter((n.op, n.name or "") for n in graph.nodes)


def op_changes(
    before: collections.Counter[tuple[str, str]], after: collections.Counter[tuple[str, str]]
) -> tuple[dict[str, int], dict[str, int]]:
    """Nodes added and removed, counted by op type."""
    added: collections.Counter[str] = collections.Counter()
    removed: collections.Counter[str] = collections.Counter()
    for (op, _), n in (after - before).items():
        added[op] += n
    for (op, _), n in (before - after).items():
        removed[op] += n
    return dict(sorted(added.items())), dict(sorted(removed.items()))


def _copy_graph(graph: Graph) -> Graph:
    """An independent copy (weights shared, lazy); opset imports are not shared."""
    c = graph.copy()
    c.gs.import_domains = copy.deepcopy(graph.gs.import_domains)
    return c


# ---------------------------------------------------------------- running a graph
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


class _NotComparable(Exception):
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
            raise GraphCheckError(f"onnxruntime cannot load the graph: {_first_line(e)}") from None
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.runs = 0

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, arg in self.inputs.items():
            if name not in feeds:
                raise _NotComparable(f"input '{name}' is not one the fixed inputs provide")
            shape = feeds[name].shape
            want = list(arg.shape or [])
            if len(want) != len(shape) or any(isinstance(w, int) and w != s for w, s in zip(want, shape)):
                raise _NotComparable(f"input '{name}' is pinned to {want}; the fixed inputs feed {list(shape)}")
        self.runs += 1
        try:
            values = self.sess.run(self.outputs, {k: v for k, v in feeds.items() if k in self.inputs})
        except Exception as e:
            raise GraphCheckError(f"onnxruntime failed to run the graph: {_first_line(e)}") from None
        return dict(zip(self.outputs, values))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


# ---------------------------------------------------------------- signatures
@dataclass
class Signature:
    """How to drive a graph: its kind and the IO names that matter."""

    kind: str  # "raw", "retained" or "generic"
    pasts: list[str] = field(default_factory=list)
    presents: list[str] = field(default_factory=list)
    logits: str = ""
    why_generic: str = ""


_RAW_INPUTS = ("input_ids", "attention_mask", "position_ids")


def signature(graph: Graph) -> Signature:
    """Tell a raw export, a retained-state graph and anything else apart."""
    ins = {t.name: t for t in graph.inputs}
    outs = [t.name for t in graph.outputs]
    if "input_ids" not in ins:
        return Signature("generic", why_generic="no input_ids input")
    retained = [n for n in ins if n + RETAINED_SUFFIX in outs]
    if retained:
        if "logits" not in outs:
            return Signature("generic", why_generic="a retained-state graph without a logits output")
        extra = [n for n in ins if n not in retained and n not in ("input_ids", "position_ids")]
        if extra or "position_ids" not in ins:
            return Signature("generic", why_generic=f"retained-state inputs besides input_ids/position_ids/caches: {extra}")
        return Signature("retained", pasts=retained, presents=[n + RETAINED_SUFFIX for n in retained], logits="logits")
    logits = "logits" if "logits" in outs else (outs[0] if outs else "")
    pasts = [n for n in ins if n not in _RAW_INPUTS]
    presents = [n for n in outs if n != logits]
    rank = len(graph.outputs[outs.index(logits)].shape or []) if logits else 0
    if rank != 3:
        return Signature("generic", why_generic=f"output '{logits}' is not [batch, seq, vocab] logits")
    if len(pasts) != len(presents):
        return Signature("generic", why_generic=f"{len(pasts)} past inputs but {len(presents)} outputs besides the logits")
    for name in pasts:
        shape = ins[name].shape
        if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            return Signature("generic", why_generic=f"input '{name}' is not a [batch, heads, past, head_dim] cache")
    return Signature("raw", pasts=pasts, presents=presents, logits=logits)


def vocab_size(graph: Graph, sig: Signature) -> int | None:
    for t in graph.outputs:
        if t.name == sig.logits and t.shape and isinstance(t.shape[-1], int):
            return int(t.shape[-1])
    # The token embedding that input_ids index.
    for t in graph.inputs:
        if t.name == "input_ids":
            for node in t.outputs:
                if node.op == "Gather" and node.inputs[1] is t and node.inputs[0].shape and isinstance(node.inputs[0].shape[0], int):
                    return int(node.inputs[0].shape[0])
    return None


# ---------------------------------------------------------------- fixed inputs
@dataclass
class FixedInputs:
    """What every stage is fed: prompts and teacher-forced continuations, or generic feeds."""

    kind: str  # "lm" or "generic"
    batch: int = 0
    prompts: list[list[int]] = field(default_factory=list)
    continuations: list[list[int]] = field(default_factory=list)
    vocab: int = 0
    ctx_len: int = 0
    feeds: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def prompt_len(self) -> int:
        return len(self.prompts[0]) if self.prompts else 0

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "generic":
            return {"kind": "generic", "feeds": {k: list(v.shape) for k, v in self.feeds.items()}}
        return {
            "kind": "lm",
            "batch": self.batch,
            "prompt_len": self.prompt_len,
            "decode_steps": len(self.continuations[0]),
            "vocab": self.vocab,
            "ctx_len": self.ctx_len,
            "prompts": self.prompts,
            "continuations": self.continuations,
        }


def fixed_inputs(
    graph: Graph,
    sig: Signature,
    *,
    batch_size: int | None,
    ctx_len: int,
    prompt_len: int = PROMPT_LEN,
    decode_steps: int = DECODE_STEPS,
    seed: int = 0,
    seq_len: int | None = None,
) -> FixedInputs:
    """Deterministic inputs derived from the input graph's signature.

    ``seq_len`` is the width a pipeline pins (else the input graph's own pinned
    width, if any): a pinned graph of width S decodes position p as a chunk of
    S slots, so the inputs end S-1 tokens before the cache does.
    """
    rng = np.random.default_rng(seed)
    if sig.kind == "generic":
        feeds: dict[str, np.ndarray] = {}
        sizes: dict[str, int] = {}
        for t in graph.inputs:
            shape = [d if isinstance(d, int) else sizes.setdefault(str(d), GENERIC_DIM) for d in (t.shape or [])]
            dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
            if dtype.kind == "f":
                feeds[t.name] = rng.uniform(0.5, 1.5, shape).astype(dtype)
            else:
                feeds[t.name] = np.zeros(shape, dtype)
        return FixedInputs("generic", feeds=feeds)
    ids = next(t for t in graph.inputs if t.name == "input_ids")
    batch = batch_size or (ids.shape[0] if ids.shape and isinstance(ids.shape[0], int) else DEFAULT_BATCH)
    vocab = vocab_size(graph, sig)
    if vocab is None:
        raise GraphCheckError("cannot tell the vocabulary size (the logits' last dim is not a number); pin it in the input graph")
    if sig.kind == "retained":
        shape = next(t.shape for t in graph.inputs if t.name == sig.pasts[0])
        if not shape or not isinstance(shape[2], int):
            raise GraphCheckError(f"the cache '{sig.pasts[0]}' has no fixed length (dim 2); it is not a retained-state graph")
        ctx_len = int(shape[2])
    if seq_len is None and ids.shape and len(ids.shape) > 1 and isinstance(ids.shape[1], int):
        seq_len = int(ids.shape[1])
    context = min(ctx_len, model_max_length(graph) or ctx_len)
    if context < 2:
        raise GraphCheckError(f"a context of {context} tokens is too short to prefill and decode; raise --ctx-len")
    width = seq_len or 1
    limit = min(context, ctx_len - (width - 1))
    if limit < 2:
        raise GraphCheckError(f"a cache of {ctx_len} slots is too short to decode through chunks of {width} (seq_len); "
                              f"raise --ctx-len to at least {width + 1}")  # fmt: skip
    decode_steps = max(1, min(decode_steps, limit // 2))
    prompt_len = max(1, min(prompt_len, limit - decode_steps))
    prompts = rng.integers(0, vocab, (batch, prompt_len)).tolist()
    conts = rng.integers(0, vocab, (batch, decode_steps)).tolist()
    return FixedInputs("lm", batch, prompts, conts, vocab, ctx_len)


# ---------------------------------------------------------------- drivers
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
        raise _NotComparable("the past has a pinned length and there is no attention_mask to hide it")
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
        raise _NotComparable(f"the cache '{sig.pasts[0]}' has shape {shape}; expected [batch, heads, ctx_len, head_dim] with numbers")
    ctx = int(shape[2])
    need = fixed.prompt_len + len(fixed.continuations[0])
    if ctx < need:
        raise _NotComparable(f"the cache holds {ctx} tokens; the fixed inputs need {need}")
    cache = CacheSpec(list(sig.pasts), (fixed.batch, int(shape[1]), ctx, int(shape[3])), np.dtype(ins[sig.pasts[0]].dtype or np.float32))
    seq = (ins["input_ids"].shape or [None, None])[1]
    pinned = isinstance(seq, int)
    prefill_len = int(seq) if pinned else fixed.prompt_len  # type: ignore[arg-type]

    def decode(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if pinned and prefill_len > 1:
            # The pinned graph decodes one token padded to its width (position -1 = padding).
            ids = np.zeros((fixed.batch, prefill_len), np.int64)
            pos = np.full((fixed.batch, prefill_len), -1, np.int64)
            ids[:, :1], pos[:, :1] = feeds["input_ids"], feeds["position_ids"]
            feeds = {**feeds, "input_ids": ids, "position_ids": pos}
        return step(feeds)

    steps = teacher_forced_logits(step, decode, cache, fixed.prompts, fixed.continuations, prefill_len)
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
            raise _NotComparable(f"the graph is neither a raw export nor a retained-state graph ({sig.why_generic})")
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
        raise _NotComparable(f"a {got.kind} graph cannot be compared with a {ref.kind} reference")
    keys = [k for k in ref.values if k in got.values]
    if not keys:
        raise _NotComparable("the graph produces nothing the reference does (no common positions or outputs)")
    worst, worst_key = -1.0, keys[0]
    agree = True
    for k in keys:
        r = np.asarray(ref.values[k], np.float64)
        g = np.asarray(got.values[k], np.float64)
        if r.shape != g.shape:
            raise _NotComparable(f"{_key_text(k)}: shape {list(g.shape)}, the reference has {list(r.shape)}")
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


# ---------------------------------------------------------------- the report
@dataclass
class StageRecord:
    """One pass: what it did, and how its graph compares with the reference."""

    index: int
    name: str
    modified: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    added: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    signature: str = ""
    max_abs_diff: float | None = None
    top1_agrees: bool | None = None
    compared: int = 0
    worst: str = ""
    ok: bool = True
    error: str | None = None
    near_misses: list[dict[str, str]] = field(default_factory=list)
    supports_max_matches: bool = False
    sites: int | None = None
    dump: str | None = None
    eval_seconds: float = 0.0


@dataclass
class Bisection:
    """The match site of the first bad pass whose rewrite breaks the numbers."""

    pass_name: str
    index: int
    n_sites: int
    k: int | None = None  # the 1-based site; None if no k reproduces the failure
    site: list[str] = field(default_factory=list)
    site_ops: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None  # with the first k sites
    prev_max_abs_diff: float | None = None  # with the first k - 1 sites
    steps: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass"] = d.pop("pass_name")
        return d


@dataclass
class DebugReport:
    """Everything :func:`debug_passes` found; ``to_dict`` is the tool's JSON."""

    model: str
    atol: float
    inputs: dict[str, Any]
    reference: dict[str, Any]
    stages: list[StageRecord] = field(default_factory=list)
    bisection: Bisection | None = None
    out_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def first_bad(self) -> StageRecord | None:
        return next((s for s in self.stages if not s.ok), None)

    @property
    def first_bad_pass(self) -> str | None:
        bad = self.first_bad
        return bad.name if bad else None

    def __getitem__(self, name: str) -> StageRecord:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        bad = self.first_bad
        return _jsonable(
            {
                "model": self.model,
                "out_dir": self.out_dir,
                "atol": self.atol,
                "inputs": self.inputs,
                "reference": self.reference,
                "first_bad_pass": bad.name if bad else None,
                "first_bad_index": bad.index if bad else None,
                "bisection": self.bisection.to_dict() if self.bisection else None,
                "passes": [asdict(s) for s in self.stages],
                "notes": list(self.notes),
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        rows = [("#", "pass", "changed", "nodes", "ops +/-", "max|diff|", "top1", "status", "stats")]
        ref = self.reference
        rows.append(("0", "(input)", "", str(ref.get("nodes", "")), "", "ref", "", ref.get("signature", ""), ""))
        for s in self.stages:
            nodes = f"{s.nodes_before} -> {s.nodes_after}" if s.nodes_before != s.nodes_after else str(s.nodes_after)
            status = "ok" if s.ok else ("ERROR" if s.error else "BAD")
            top1 = "-" if s.top1_agrees is None else ("yes" if s.top1_agrees else "NO")
            stats = ", ".join(f"{k}={v}" for k, v in s.stats.items()) or "-"
            rows.append((str(s.index), s.name, "yes" if s.modified else "no", nodes, _ops_text(s.added, s.removed),
                         _num(s.max_abs_diff), top1, status, stats))  # fmt: skip
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
        lines = []
        for j, r in enumerate(rows):
            lines.append("  ".join([r[c].ljust(widths[c]) for c in range(len(widths))] + [r[-1]]).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths) + "  -----")
        lines.append("")
        bad = self.first_bad
        if bad is None:
            lines.append(f"every pass is within atol {self.atol:g} of the input graph")
        else:
            why = bad.error or f"max |diff| {_num(bad.max_abs_diff)} > atol {self.atol:g} at {bad.worst}"
            lines.append(f"first bad pass: #{bad.index} {bad.name} ({why})")
        if self.bisection is not None:
            b = self.bisection
            if b.k is not None:
                lines.append(f"bisection: match {b.k} of {b.n_sites} of '{b.pass_name}' breaks the numbers "
                             f"(max |diff| {_num(b.prev_max_abs_diff)} with {b.k - 1} sites, {_num(b.max_abs_diff)} with {b.k})")  # fmt: skip
                lines.append("  site: " + ", ".join(f"{n} ({op})" for n, op in zip(b.site, b.site_ops)))
            else:
                lines.append(f"bisection of '{b.pass_name}': {b.note}")
        for s in self.stages:
            if s.error and s is not bad:
                lines.append(f"#{s.index} {s.name}: {s.error}")
        misses = [(s, m) for s in self.stages for m in s.near_misses]
        if misses:
            lines.append("near misses (candidates that did not fire, and why):")
            for s in self.stages:
                for m in s.near_misses[:NEAR_MISSES_SHOWN]:
                    where = f"{m['op']} '{m['anchor']}'" if m.get("anchor") else "graph"
                    lines.append(f"  #{s.index} {s.name}: {where}: {m['reason']}")
                if len(s.near_misses) > NEAR_MISSES_SHOWN:
                    lines.append(f"  #{s.index} {s.name}: ... and {len(s.near_misses) - NEAR_MISSES_SHOWN} more (see --json)")
        lines += [f"note: {n}" for n in self.notes]
        if self.out_dir:
            lines.append(f"dumps: {self.out_dir}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _ops_text(added: dict[str, int], removed: dict[str, int], limit: int = 4) -> str:
    parts = [(n, f"+{n} {op}") for op, n in added.items()] + [(n, f"-{n} {op}") for op, n in removed.items()]
    parts.sort(key=lambda p: -p[0])
    text = ", ".join(p[1] for p in parts[:limit])
    return text + (", ..." if len(parts) > limit else "") or "-"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def near_misses_of(p: Pass) -> list[dict[str, str]]:
    """A pass's declined candidates: ``near_misses`` (anchor/op/reason) and ``declined`` strings."""
    out: list[dict[str, str]] = []
    for m in getattr(p, "near_misses", None) or []:
        get = m.get if isinstance(m, dict) else (lambda k, m=m: getattr(m, k, ""))
        out.append({"anchor": str(get("anchor") or ""), "op": str(get("op") or ""), "reason": str(get("reason") or "")})
    for r in getattr(p, "declined", None) or []:
        if isinstance(r, str):
            out.append({"anchor": "", "op": "", "reason": r})
    return out


# ---------------------------------------------------------------- the driver
def debug_passes(
    model: str | Path | Graph,
    passes: Sequence[str | Pass] | None = None,
    *,
    pass_modules: Sequence[str | Path] = (),
    ctx_len: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    out_dir: str | Path | None = DEFAULT_OUT,
    atol: float = DEFAULT_ATOL,
    bisect: bool = True,
    threads: int | None = None,
    prompt_len: int = PROMPT_LEN,
    decode_steps: int = DECODE_STEPS,
    progress: Progress | None = None,
) -> DebugReport:
    """Run ``passes`` (default: the default pipeline) one at a time, checking each.

    ``model`` is an ONNX file (or a :class:`Graph`, rewritten in place).
    ``passes`` are names (including those of ``pass_modules``' passes) or
    instances. ``batch_size`` and ``seq_len`` pin shapes as in ``optimize``
    and fix the batch of the inputs. With ``out_dir`` the stage dumps go there
    (old ``NNN_*`` dumps in it are removed first). Errors a user can cause
    (unknown pass, bad module, an input graph that does not run) raise
    :class:`~qgraph.errors.QGraphError`; a pass that raises, or whose graph
    does not run, is reported as bad instead.
    """
    say = progress or (lambda msg: None)
    if (batch_size is None) != (seq_len is None):
        raise QGraphError("give both --batch-size and --seq-len to pin shapes, or neither")
    for what, value in (("ctx_len", ctx_len), ("batch size", batch_size), ("seq_len", seq_len)):
        if value is not None and value < 1:
            raise QGraphError(f"{what} must be at least 1, got {value}")
    if not atol >= 0:
        raise QGraphError(f"atol must be a non-negative number, got {atol}")
    for m in pass_modules:
        load_pass_module(m)
    graph = model if isinstance(model, Graph) else Graph.load(model)
    opts = Options(ctx_len=ctx_len or default_ctx_len(graph), batch_size=batch_size, seq_len=seq_len)
    instances = make_passes(passes, opts)
    validate_order(instances)

    sig = signature(graph)
    fixed = fixed_inputs(graph, sig, batch_size=batch_size, ctx_len=opts.ctx_len, prompt_len=prompt_len, decode_steps=decode_steps,
                         seq_len=seq_len)  # fmt: skip
    say(f"reference: the input graph ({graph.node_count()} nodes, {sig.kind}) on {_inputs_text(fixed)}")
    t0 = time.perf_counter()
    try:
        ref = run_graph(graph, fixed, threads=threads)
    except _NotComparable as e:
        raise GraphCheckError(f"the input graph cannot be driven with fixed inputs: {e}") from None
    reference = {"signature": sig.kind, "nodes": graph.node_count(), "positions": len(ref.values), "runs": ref.runs,
                 "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    name = str(model) if not isinstance(model, Graph) else graph.name
    report = DebugReport(name, atol, fixed.to_dict(), reference)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for f in out.iterdir():
            if f.is_file() and (_DUMP_RE.match(f.name) or f.name in ("report.json", "report.txt")):
                f.unlink()
        (out / "000_input.onnxtxt").write_text(weightless_text(graph))
        report.out_dir = str(out)

    for i, p in enumerate(instances, 1):
        rec = StageRecord(i, p.name, supports_max_matches=bool(getattr(p, "supports_max_matches", False)))
        report.stages.append(rec)
        want_bisect = bisect and rec.supports_max_matches and report.first_bad is None
        pre = _copy_graph(graph) if want_bisect else None
        before = _node_keys(graph)
        rec.nodes_before = graph.node_count()
        say(f"#{i} {p.name}: running")
        t0 = time.perf_counter()
        try:
            result = p.run(graph)
            if not isinstance(result, PassResult):
                raise PassError(f"returned {type(result).__name__}, expected qgraph.PassResult(graph, modified, stats)")
        except Exception as e:
            rec.seconds = time.perf_counter() - t0
            rec.ok, rec.error = False, f"the pass raised {_first_line(e)}"
            report.notes.append(f"stopped after pass #{i} '{p.name}' raised; later passes did not run")
            log.debug("pass %s raised", p.name, exc_info=True)
            if out is not None:
                (out / f"{i:03d}_{_file_part(p.name)}.json").write_text(json.dumps(_jsonable(asdict(rec)), indent=2))
            break
        rec.seconds = time.perf_counter() - t0
        graph = result.graph
        rec.modified, rec.stats = bool(result.modified), dict(result.stats)
        rec.nodes_after = graph.node_count()
        rec.added, rec.removed = op_changes(before, _node_keys(graph))
        rec.near_misses = near_misses_of(p)
        sites = getattr(p, "sites", None)
        rec.sites = len(sites) if rec.supports_max_matches and isinstance(sites, list) else None
        if out is not None:
            dump = out / f"{i:03d}_{_file_part(p.name)}.onnxtxt"
            dump.write_text(weightless_text(graph))
            rec.dump = str(dump)
        _evaluate(rec, graph, ref, fixed, atol, threads)
        say(f"#{i} {p.name}: {'ok' if rec.ok else 'BAD'}, max |diff| {_num(rec.max_abs_diff)}"
            + (f" ({rec.error})" if rec.error else ""))  # fmt: skip
        if not rec.ok and report.first_bad is rec and pre is not None:
            report.bisection = _bisect(p, rec, pre, ref, fixed, atol, threads, say)
        del pre
        if out is not None:
            entry = asdict(rec)
            if report.bisection is not None and report.bisection.index == i:
                entry["bisection"] = report.bisection.to_dict()
            (out / f"{i:03d}_{_file_part(p.name)}.json").write_text(json.dumps(_jsonable(entry), indent=2))
    if isinstance(model, Graph) and graph is not model:
        model.adopt(graph)
    if out is not None:
        (out / "report.json").write_text(report.to_json())
        (out / "report.txt").write_text(report.table() + "\n")
    return report


def _file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "pass"


def _inputs_text(fixed: FixedInputs) -> str:
    if fixed.kind == "generic":
        return f"fixed feeds for {len(fixed.feeds)} inputs"
    return f"{fixed.batch} rows x ({fixed.prompt_len} prompt + {len(fixed.continuations[0])} decode) tokens"


def _evaluate(rec: StageRecord, graph: Graph, ref: Outputs, fixed: FixedInputs, atol: float, threads: int | None) -> Comparison | None:
    t0 = time.perf_counter()
    rec.signature = signature(graph).kind
    try:
        got = run_graph(graph, fixed, threads=threads)
        c = compare(ref, got, atol)
    except (_NotComparable, GraphCheckError) as e:
        rec.ok, rec.error = False, str(e)
        return None
    finally:
        rec.eval_seconds = time.perf_counter() - t0
    rec.max_abs_diff, rec.top1_agrees, rec.compared, rec.worst = c.max_abs_diff, c.top1_agrees, c.compared, c.worst
    rec.ok = c.max_abs_diff is not None and c.max_abs_diff <= atol
    return c


def _bisect(p: Pass, rec: StageRecord, pre: Graph, ref: Outputs, fixed: FixedInputs, atol: float, threads: int | None,
            say: Progress) -> Bisection:  # fmt: skip
    """Smallest k whose first-k-sites run exceeds atol (k = 0 is the clean input graph)."""
    full_sites = [list(s) for s in getattr(p, "sites", []) or []]
    saved = {a: getattr(p, a) for a in ("max_matches", "sites", "near_misses", "declined") if hasattr(p, a)}
    b = Bisection(p.name, rec.index, len(full_sites))
    if not full_sites:
        b.note = "the pass rewrote no match site, so there is nothing to bisect"
        return b
    ops = {n.name: n.op for n in pre.nodes}
    lo, hi = 0, len(full_sites)  # lo: known good, hi: known bad
    diffs: dict[int, float | None] = {0: 0.0, hi: rec.max_abs_diff}
    try:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = _copy_graph(pre)
            p.max_matches = mid  # type: ignore[attr-defined]
            p.run(trial)
            probe = StageRecord(rec.index, p.name)
            _evaluate(probe, trial, ref, fixed, atol, threads)
            del trial
            b.steps.append({"k": mid, "max_abs_diff": probe.max_abs_diff, "ok": probe.ok, "error": probe.error})
            say(f"#{rec.index} {p.name}: bisect k={mid}: {'ok' if probe.ok else 'bad'}, max |diff| {_num(probe.max_abs_diff)}")
            diffs[mid] = probe.max_abs_diff
            if probe.ok:
                lo = mid
            else:
                hi = mid
    except Exception as e:  # a pass that cannot stop early is reported, not fatal
        b.note = f"bisection stopped: the pass raised {_first_line(e)} with max_matches={p.max_matches}"  # type: ignore[attr-defined]
        return b
    finally:
        for a, v in saved.items():
            setattr(p, a, v)
    b.k = hi
    b.site = full_sites[hi - 1]
    b.site_ops = [ops.get(n, "?") for n in b.site]
    b.max_abs_diff, b.prev_max_abs_diff = diffs.get(hi), diffs.get(lo)
    return b
