"""What :func:`~qgraph.devtools.debug.debug_passes` found: one record per pass, the bisection, the table and the JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from qgraph.pipeline.manager import Pass

#: Near misses printed per pass in the table (the JSON has all of them).
NEAR_MISSES_SHOWN = 20


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
        return jsonable(
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
                         num_text(s.max_abs_diff), top1, status, stats))  # fmt: skip
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
            why = bad.error or f"max |diff| {num_text(bad.max_abs_diff)} > atol {self.atol:g} at {bad.worst}"
            lines.append(f"first bad pass: #{bad.index} {bad.name} ({why})")
        if self.bisection is not None:
            b = self.bisection
            if b.k is not None:
                lines.append(f"bisection: match {b.k} of {b.n_sites} of '{b.pass_name}' breaks the numbers "
                             f"(max |diff| {num_text(b.prev_max_abs_diff)} with {b.k - 1} sites, {num_text(b.max_abs_diff)} with {b.k})")  # fmt: skip
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


def num_text(x: float | None) -> str:
    """A difference for the table: three significant digits, ``-`` for none."""
    return "-" if x is None else f"{x:.3g}"


def _ops_text(added: dict[str, int], removed: dict[str, int], limit: int = 4) -> str:
    parts = [(n, f"+{n} {op}") for op, n in added.items()] + [(n, f"-{n} {op}") for op, n in removed.items()]
    parts.sort(key=lambda p: -p[0])
    text = ", ".join(p[1] for p in parts[:limit])
    return text + (", ..." if len(parts) > limit else "") or "-"


def jsonable(x: Any) -> Any:
    """``x`` with numpy values made plain and anything else unknown made a string, for ``json.dumps``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
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
