"""The pass protocol and the pass manager.

A pass is a small class: a ``name`` (used on the command line), the facts it
``requires`` and ``produces``, and ``run(graph) -> PassResult``. The manager
checks the order before running anything (every requirement must be produced
by an earlier pass or be an initial fact), times each pass, records node
counts and stats in a :class:`Report`, and in check mode verifies the graph
after every pass, naming the pass that broke it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from qgraph.errors import GraphCheckError, PassError, PassOrderError, QGraphError
from qgraph.ir.graph import Graph

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What a pass returns: the graph, whether it changed, and what it did."""

    graph: Graph
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    #: Facts this run established about the graph beyond the pass's declared ``produces``
    #: (e.g. fuse-decode-attention's "prefill_chunks_consecutive" when it rewrote a prompt chunk).
    facts: tuple[str, ...] = ()
    #: What a user should read about this run (e.g. why retain-kv-cache found no cache): the report's notes, after the pass's name.
    notes: tuple[str, ...] = ()


class Pass:
    """Base class of a rewrite pass.

    Subclasses set ``name`` (kebab-case, used by ``--passes``), ``requires``,
    ``produces`` and ``invalidates`` (fact names of :mod:`qgraph.pipeline.facts`,
    such as ``"static_shapes"``; a requirement is a fact without which the pass
    is wrong or finds nothing to do), and implement
    :meth:`run`. A pass edits the graph through :class:`qgraph.Graph`'s API or
    ``graph.gs``, never calls cleanup itself, and names the nodes it creates
    ``<name>/<n>``.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()
    #: Facts a pass makes false (e.g. a rewrite that appends nodes undoes "toposorted").
    invalidates: ClassVar[tuple[str, ...]] = ()
    #: True if :meth:`run` honours ``max_matches`` (rewrite only the first k match
    #: sites, in a deterministic order; k = 0 leaves the graph's numbers unchanged)
    #: and lists the node names of each site it rewrote in ``self.sites``. The
    #: pass-debugging tool bisects such a pass over k to name the site that breaks
    #: the numbers.
    supports_max_matches: ClassVar[bool] = False
    #: With ``supports_max_matches``: rewrite at most this many sites (None: all).
    max_matches: int | None = None

    def run(self, graph: Graph) -> PassResult:
        raise NotImplementedError(f"pass {type(self).__name__} does not implement run()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


@dataclass
class PassRecord:
    """One row of the report."""

    name: str
    modified: bool
    stats: dict[str, Any]
    seconds: float
    nodes_before: int
    nodes_after: int
    checked: bool = False


@dataclass
class Report:
    """What a pipeline run did, pass by pass."""

    records: list[PassRecord] = field(default_factory=list)
    #: Things a user should know that are not errors (e.g. custom-domain ops left untouched).
    notes: list[str] = field(default_factory=list)
    #: What holds of the graph after the run: the initial facts, then each pass's declared ``produces`` and reported
    #: ``facts`` less its ``invalidates``.
    facts: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def __getitem__(self, name: str) -> PassRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [asdict(r) for r in self.records], "seconds": self.seconds, "notes": list(self.notes), "facts": list(self.facts)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def table(self) -> str:
        rows = [("#", "pass", "changed", "nodes", "time ms", "stats")]
        for i, r in enumerate(self.records):
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items()) or "-"
            nodes = f"{r.nodes_before} -> {r.nodes_after}" if r.nodes_before != r.nodes_after else str(r.nodes_after)
            rows.append((str(i), r.name, "yes" if r.modified else "no", nodes, f"{r.seconds * 1e3:.1f}", stats))
        rows.append(("", "total", "yes" if self.modified else "no", "", f"{self.seconds * 1e3:.1f}", ""))
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
        lines = []
        for j, row in enumerate(rows):
            cells = [row[c].ljust(widths[c]) for c in range(len(widths))] + [row[-1]]
            lines.append("  ".join(cells).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths) + "  -----")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def validate_order(passes: Sequence[Pass], initial_facts: Iterable[str] = ()) -> None:
    """Raise :class:`PassOrderError` if a pass requires a fact nothing earlier produces."""
    facts = set(initial_facts)
    producers: dict[str, list[str]] = {}
    for p in passes:
        for f in p.produces:
            producers.setdefault(f, []).append(p.name)
    for i, p in enumerate(passes):
        if not p.name:
            raise PassOrderError(f"{type(p).__name__} has no name; set the class attribute 'name'")
        missing = [f for f in p.requires if f not in facts]
        if missing:
            hints = []
            for f in missing:
                later = producers.get(f)
                hints.append(
                    f"'{f}' (produced by {', '.join(later)}, which must come first)"
                    if later
                    else f"'{f}' (no pass in the pipeline produces it)"
                )
            raise PassOrderError(f"pass #{i} '{p.name}' requires {', '.join(hints)}")
        facts -= set(p.invalidates)
        facts |= set(p.produces)


class PassManager:
    """Runs passes in the given order (it validates, never reorders)."""

    def __init__(self, passes: Sequence[Pass], *, check: bool = False, initial_facts: Iterable[str] = ()) -> None:
        self.passes = list(passes)
        self.check = check
        self.initial_facts = tuple(initial_facts)

    def validate(self) -> None:
        validate_order(self.passes, self.initial_facts)

    def run(self, graph: Graph, report: Report | None = None) -> tuple[Graph, Report]:
        """Run every pass; returns the final graph and the report."""
        self.validate()
        if report is None:
            report = Report(facts=sorted(self.initial_facts))
        done: list[str] = []
        for p in self.passes:
            before = graph.node_count()
            t0 = time.perf_counter()
            try:
                result = p.run(graph)
            except QGraphError:
                raise
            except Exception as e:
                ran = ", ".join(done) or "none"
                raise PassError(f"pass '{p.name}' failed: {type(e).__name__}: {e} (passes run before it: {ran})") from e
            seconds = time.perf_counter() - t0
            if not isinstance(result, PassResult):
                raise PassError(f"pass '{p.name}' returned {type(result).__name__}, expected qgraph.PassResult(graph, modified, stats)")
            graph = result.graph
            rec = PassRecord(p.name, bool(result.modified), dict(result.stats), seconds, before, graph.node_count())
            if self.check:
                try:
                    graph.check()
                except GraphCheckError as e:
                    raise GraphCheckError(f"after pass '{p.name}': {e}") from None
                rec.checked = True
            report.records.append(rec)
            report.notes += [f"{p.name}: {note}" for note in result.notes]
            done.append(p.name)
            facts = (set(report.facts) - set(p.invalidates)) | set(p.produces) | set(result.facts)
            report.facts = sorted(facts)
            log.info(
                "%s: %s, %d -> %d nodes, %.1f ms %s",
                p.name,
                "changed" if rec.modified else "unchanged",
                before,
                rec.nodes_after,
                seconds * 1e3,
                rec.stats or "",
            )
        return graph, report
