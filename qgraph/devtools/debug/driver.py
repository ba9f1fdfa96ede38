"""The driver: run a pipeline one pass at a time, dump and check each stage, and bisect the first bad pass over its match sites."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from qgraph.devtools.debug.dumps import copy_graph, node_keys, op_changes, weightless_text
from qgraph.devtools.debug.execute import Comparison, NotComparable, Outputs, compare, first_line, run_graph
from qgraph.devtools.debug.inputs import DECODE_STEPS, PROMPT_LEN, FixedInputs, fixed_inputs, signature
from qgraph.devtools.debug.report import Bisection, DebugReport, StageRecord, jsonable, near_misses_of, num_text
from qgraph.devtools.debug.third_party import load_pass_module, make_passes
from qgraph.errors import GraphCheckError, PassError, QGraphError
from qgraph.ir.graph import Graph
from qgraph.pipeline.facts import observe
from qgraph.pipeline.manager import Pass, PassResult, validate_order
from qgraph.pipeline.optimize import graph_max_positions, graph_max_positions_why, retained_cache_len
from qgraph.pipeline.options import Options, check_pin

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("debug_passes_out")
DEFAULT_ATOL = 1e-3
_DUMP_RE = re.compile(r"^\d{3}_.+\.(onnxtxt|json)$")

Progress = Callable[[str], None]


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
    check_pin(batch_size, seq_len)
    if not atol >= 0:
        raise QGraphError(f"atol must be a non-negative number, got {atol}")
    for m in pass_modules:
        load_pass_module(m)
    graph = model if isinstance(model, Graph) else Graph.load(model)
    cache_len = retained_cache_len(graph)
    opts = Options.resolve(
        ctx_len=ctx_len,
        batch_size=batch_size,
        seq_len=seq_len,
        max_positions=graph_max_positions(graph),
        max_positions_why=graph_max_positions_why(graph),
        cache_len=cache_len,
    )
    if cache_len is not None:  # an already retained graph fixes its cache's length
        opts.check_cache_len(cache_len)
    instances = make_passes(passes, opts)
    validate_order(instances, observe(graph))

    sig = signature(graph)
    fixed = fixed_inputs(graph, sig, batch_size=batch_size, ctx_len=opts.ctx_len, prompt_len=prompt_len, decode_steps=decode_steps,
                         seq_len=seq_len)  # fmt: skip
    say(f"reference: the input graph ({graph.node_count()} nodes, {sig.kind}) on {_inputs_text(fixed)}")
    t0 = time.perf_counter()
    try:
        ref = run_graph(graph, fixed, threads=threads)
    except NotComparable as e:
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
        pre = copy_graph(graph) if want_bisect else None
        before = node_keys(graph)
        rec.nodes_before = graph.node_count()
        say(f"#{i} {p.name}: running")
        t0 = time.perf_counter()
        try:
            result = p.run(graph)
            if not isinstance(result, PassResult):
                raise PassError(f"returned {type(result).__name__}, expected qgraph.PassResult(graph, modified, stats)")
        except Exception as e:
            rec.seconds = time.perf_counter() - t0
            rec.ok, rec.error = False, f"the pass raised {first_line(e)}"
            report.notes.append(f"stopped after pass #{i} '{p.name}' raised; later passes did not run")
            log.debug("pass %s raised", p.name, exc_info=True)
            if out is not None:
                (out / f"{i:03d}_{_file_part(p.name)}.json").write_text(json.dumps(jsonable(asdict(rec)), indent=2))
            break
        rec.seconds = time.perf_counter() - t0
        graph = result.graph
        rec.modified, rec.stats = bool(result.modified), dict(result.stats)
        rec.nodes_after = graph.node_count()
        rec.added, rec.removed = op_changes(before, node_keys(graph))
        rec.near_misses = near_misses_of(p)
        sites = getattr(p, "sites", None)
        rec.sites = len(sites) if rec.supports_max_matches and isinstance(sites, list) else None
        if out is not None:
            dump = out / f"{i:03d}_{_file_part(p.name)}.onnxtxt"
            dump.write_text(weightless_text(graph))
            rec.dump = str(dump)
        _evaluate(rec, graph, ref, fixed, atol, threads)
        say(f"#{i} {p.name}: {'ok' if rec.ok else 'BAD'}, max |diff| {num_text(rec.max_abs_diff)}"
            + (f" ({rec.error})" if rec.error else ""))  # fmt: skip
        if not rec.ok and report.first_bad is rec and pre is not None:
            report.bisection = _bisect(p, rec, pre, ref, fixed, atol, threads, say)
        del pre
        if out is not None:
            entry = asdict(rec)
            if report.bisection is not None and report.bisection.index == i:
                entry["bisection"] = report.bisection.to_dict()
            (out / f"{i:03d}_{_file_part(p.name)}.json").write_text(json.dumps(jsonable(entry), indent=2))
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
    except (NotComparable, GraphCheckError) as e:
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
            trial = copy_graph(pre)
            p.max_matches = mid  # type: ignore[attr-defined]
            p.run(trial)
            probe = StageRecord(rec.index, p.name)
            _evaluate(probe, trial, ref, fixed, atol, threads)
            del trial
            b.steps.append({"k": mid, "max_abs_diff": probe.max_abs_diff, "ok": probe.ok, "error": probe.error})
            say(f"#{rec.index} {p.name}: bisect k={mid}: {'ok' if probe.ok else 'bad'}, max |diff| {num_text(probe.max_abs_diff)}")
            diffs[mid] = probe.max_abs_diff
            if probe.ok:
                lo = mid
            else:
                hi = mid
    except Exception as e:  # a pass that cannot stop early is reported, not fatal
        b.note = f"bisection stopped: the pass raised {first_line(e)} with max_matches={p.max_matches}"  # type: ignore[attr-defined]
        return b
    finally:
        for a, v in saved.items():
            setattr(p, a, v)
    b.k = hi
    b.site = full_sites[hi - 1]
    b.site_ops = [ops.get(n, "?") for n in b.site]
    b.max_abs_diff, b.prev_max_abs_diff = diffs.get(hi), diffs.get(lo)
    return b
