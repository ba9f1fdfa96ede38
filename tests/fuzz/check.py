"""The fuzz check: run a case's pass and say what it did, or fail.

:func:`check` returns ``"rewrite"`` (then the graph passed ``Graph.check``
(checker, strict shape inference) and its outputs equal the original's on
random inputs through onnxruntime), ``"decline"`` (then the graph is
unchanged) or ``"refused"`` (the pass raised a typed
:class:`~qgraph.errors.QGraphError`, a clean refusal). Anything else raises:
that is a failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from helpers import assert_same_outputs, run_shared_state, session

from fuzz.builder import CUSTOM_DOMAIN, Case
from qgraph.devtools.golden import canonical_text
from qgraph.errors import QGraphError
from qgraph.ir.graph import Graph


@dataclass
class Outcome:
    kind: str  # "rewrite", "decline" or "refused"
    detail: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def check(case: Case) -> Outcome:
    """Run the case's pass; return what it did, or raise AssertionError (a failure). See the module docstring."""
    original = Graph.from_proto(case.model)
    reference = Graph.from_proto(case.model)
    reference.cleanup()
    try:
        reference.check()
    except QGraphError as e:
        raise AssertionError(f"the generated graph itself is invalid (a bug in the strategy): {e}") from None
    graph = Graph.from_proto(case.model)
    p = case.make_pass()
    try:
        result = p.run(graph)
    except QGraphError as e:
        return Outcome("refused", f"{type(e).__name__}: {e}")
    out = result.graph
    out.cleanup()
    if not result.modified:
        # Unchanged means the same nodes, edges and constants; shape inference may refine the outputs' declared shapes.
        for g in (out, reference):
            for t in g.outputs:
                t.shape = None
        if canonical_text(out) != canonical_text(reference):
            raise AssertionError(f"{case.pass_name} reported no change but changed the graph (stats {result.stats})")
        return Outcome("decline", "", dict(result.stats))
    out.check()
    if case.custom_node is not None:
        kept = [n for n in out.nodes if n.name == case.custom_node and n.domain == CUSTOM_DOMAIN]
        if not kept:
            raise AssertionError(f"{case.pass_name} rewrote the custom-domain node '{case.custom_node}' (stats {result.stats})")
        return Outcome("rewrite", "custom node kept; onnxruntime cannot run it", dict(result.stats))
    if case.kv is not None:
        _compare_decode_step(original, out, case)
    else:
        _compare(original, out, case)
    if case.idempotent:
        again = case.make_pass().run(out)
        if again.modified:
            raise AssertionError(f"{case.pass_name} is not idempotent: a second run changed the graph again ({again.stats})")
    return Outcome("rewrite", "", dict(result.stats))


def _compare(before: Graph, after: Graph, case: Case) -> None:
    feeds = case.feeds
    if feeds:
        sa, sb = session(before), session(after)
        names = [o.name for o in sa.get_outputs()]
        inputs = {i.name for i in sa.get_inputs()}
        rng = np.random.default_rng(0)
        full = {}
        for i in sa.get_inputs():
            if i.name in feeds:
                full[i.name] = feeds[i.name]
            else:
                shape = [int(d) for d in i.shape]
                full[i.name] = (rng.integers(0, 2, shape).astype(bool) if "bool" in i.type else
                                rng.standard_normal(shape).astype(np.float32) if "float" in i.type else rng.integers(-5, 5, shape))  # fmt: skip
        feeds_a = {k: v for k, v in full.items() if k in inputs}
        ra = run_shared_state(sa, feeds_a, names) if case.shared_state == "both" else sa.run(names, feeds_a)
        feeds_b = {k: v for k, v in full.items() if k in {i.name for i in sb.get_inputs()}}
        rb = run_shared_state(sb, feeds_b, names) if case.shared_state else sb.run(names, feeds_b)
        for name, x, y in zip(names, ra, rb):
            np.testing.assert_allclose(y, x, atol=case.atol, rtol=case.rtol, err_msg=f"output {name} differs")
        return
    for seed in (0, 1):
        assert_same_outputs(before, after, atol=case.atol, rtol=case.rtol, seed=seed, dims=case.dims, shared_state=case.shared_state)


def _compare_decode_step(raw: Graph, retained: Graph, case: Case) -> None:
    """One decode step: the raw graph with a past of ``past_len``, the retained one with that past in a ctx_len cache."""
    kv = case.kv
    assert kv is not None
    rng = np.random.default_rng(kv["seed"])
    B, P, C = kv["batch"], kv["past_len"], kv["ctx"]  # noqa: N806
    shape = (B, kv["heads"], P, kv["head_dim"])
    ids = rng.integers(0, kv["vocab"], (B, 1)).astype(np.int64)
    pos = np.full((B, 1), P, np.int64)
    past = {f"past_{r}.{i}": rng.standard_normal(shape).astype(np.float32) for i in range(kv["layers"]) for r in ("key", "value")}
    ref_sess = session(raw)
    ref_names = [o.name for o in ref_sess.get_outputs()]
    ref = dict(zip(ref_names, ref_sess.run(None, {"input_ids": ids, "attention_mask": np.ones((B, P + 1), np.int64), "position_ids": pos,
                                                  **past})))  # fmt: skip
    cache = {}
    for n, v in past.items():
        c = rng.standard_normal((B, kv["heads"], C, kv["head_dim"])).astype(np.float32) * 10  # garbage the mask must hide
        c[:, :, :P] = v
        cache[n] = c
    sess = session(retained)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {"input_ids": ids, "position_ids": pos, **cache})))
    np.testing.assert_allclose(got["logits"][:, 0], ref["logits"][:, -1], atol=1e-4, rtol=1e-3, err_msg="logits differ")
    for n in past:
        present = ref[n.replace("past_", "present_")]
        new = got[f"{n}_RetainedState"]
        np.testing.assert_allclose(new[:, :, : P + 1], present, atol=1e-5, err_msg=f"{n}: written slots differ")
        np.testing.assert_array_equal(new[:, :, P + 1 :], cache[n][:, :, P + 1 :], err_msg=f"{n}: slots after the step changed")
