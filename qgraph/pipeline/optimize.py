"""``optimize()``: rewrite one graph with the declared pipeline (or given passes).

The options are resolved once against the graph (its position table caps the
default ctx_len), the order is checked from the passes' facts before anything
runs, and the pass manager runs them. :func:`run_passes` is the same without
the resolution, for callers that hold resolved options (compile).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import replace

from qgraph.errors import RewriteError
from qgraph.ir.contract import MAX_POSITIONS_KEY, MAX_POSITIONS_WHY_KEY
from qgraph.ir.graph import Graph
from qgraph.ir.validate import is_custom_domain
from qgraph.pipeline.facts import KV_RETAINED, observe
from qgraph.pipeline.manager import Pass, PassManager, Report
from qgraph.pipeline.options import Options
from qgraph.pipeline.registry import build_passes, check_quantizable


def graph_max_positions(graph: Graph) -> int | None:
    """The model's maximum positions read off an exported graph (where there is no config): the rows of the
    position table that ``position_ids`` indexes, else what ``qgraph export`` recorded (``MAX_POSITIONS_KEY``), or None."""
    for t in graph.inputs:
        if t.name != "position_ids":
            continue
        for node in t.outputs:
            if node.op == "Gather" and node.inputs[1] is t and graph.is_constant(node.inputs[0]):
                shape = node.inputs[0].shape
                if shape:
                    return int(shape[0])
    recorded = graph.metadata.get(MAX_POSITIONS_KEY, "")
    return int(recorded) if recorded.isdigit() and int(recorded) > 0 else None


def graph_max_positions_why(graph: Graph) -> str | None:
    """Why :func:`graph_max_positions` is what it is, where ``qgraph export`` recorded a reason for it (a sliding window,
    a longrope switch), else None."""
    n = graph_max_positions(graph)
    if n is None or graph.metadata.get(MAX_POSITIONS_KEY) != str(n):
        return None
    return graph.metadata.get(MAX_POSITIONS_WHY_KEY) or None


def run_passes(graph: Graph, passes: Sequence[str | Pass] | None, opts: Options, *, check: bool = False,
               initial_facts: Iterable[str] | None = None, require_retained: bool = False) -> Report:  # fmt: skip
    """Rewrite ``graph`` in place with ``passes`` (None: the default pipeline) made from resolved ``opts``.

    ``initial_facts`` (default: what the graph shows, :func:`~qgraph.pipeline.facts.observe`) start the order check.
    ``require_retained``: the passes are the rewrite stage, so a graph that did not become the retained-state
    contract is an error (:class:`~qgraph.errors.RewriteError`) that gives the report's reasons.
    """
    if passes is None:
        instances = build_passes(None, opts)
    else:
        instances = [p if isinstance(p, Pass) else build_passes([p], opts)[0] for p in passes]
    facts = observe(graph) if initial_facts is None else set(initial_facts)
    custom = collections.Counter(f"{n.domain}.{n.op}" for n in graph.nodes if is_custom_domain(n.domain))
    result, report = PassManager(instances, check=check, initial_facts=facts).run(graph)
    if result is not graph:
        graph.adopt(result)
    if custom:
        # Custom ops are legal ONNX: every pass leaves them alone, and the user should know.
        ops = ", ".join(f"{op} x{k}" if k > 1 else op for op, k in sorted(custom.items()))
        report.notes.append(f"{sum(custom.values())} node(s) from custom domains left untouched: {ops}")
    if require_retained and KV_RETAINED not in observe(graph):
        why = "; ".join(report.notes) or "no pass made it"
        raise RewriteError(f"this graph cannot become the retained-state contract ({why})")
    return report


def retained_cache_len(graph: Graph) -> int | None:
    """The cache length an already retained graph fixes (its past_key inputs' third dim), else None."""
    if KV_RETAINED not in observe(graph):
        return None
    kv = next((t for t in graph.inputs if t.name.startswith("past_key.")), None)
    shape = list(kv.shape or []) if kv is not None else []
    return int(shape[2]) if len(shape) == 4 and isinstance(shape[2], int) else None


def optimize(
    graph: Graph,
    passes: Sequence[str | Pass] | None = None,
    *,
    ctx_len: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    check: bool = False,
    quantize: str | None = None,
    quant_block_size: int | None = None,
    quant_vocab: str | None = None,
) -> Report:
    """Rewrite ``graph`` in place with ``passes`` (default: the default pipeline).

    ``ctx_len`` defaults to the model's maximum length or 128, whichever is
    smaller (:class:`~qgraph.pipeline.options.Options`). With ``batch_size``
    and ``seq_len`` the shapes are pinned too. ``quantize`` (int8, int4) adds
    weight-only quantization (``quant_block_size`` weights per block, the vocabulary in ``quant_vocab``, default the mode's: options.default_quant_vocab). In check mode the graph is
    verified after every pass. Returns the pass report. The default pipeline
    raises :class:`~qgraph.errors.RewriteError` with the reason when the graph
    cannot become the retained-state contract (no growing KV cache).
    """
    cache_len = retained_cache_len(graph)
    opts = Options.resolve(ctx_len=ctx_len, batch_size=batch_size, seq_len=seq_len, max_positions=graph_max_positions(graph),
                           max_positions_why=graph_max_positions_why(graph), cache_len=cache_len, quantize=quantize,
                           quant_block_size=quant_block_size, quant_vocab=quant_vocab)  # fmt: skip
    if cache_len is not None:
        opts.check_cache_len(cache_len)
    if batch_size is None:
        opts = replace(opts, seq_len=None)  # pinning needs both: a lone seq_len pins nothing
    check_quantizable(graph, opts)
    # The default pipeline promises the contract; passes named by the caller may leave a partial graph (the report says why).
    return run_passes(graph, passes, opts, check=check, require_retained=passes is None)
