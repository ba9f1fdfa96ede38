"""A fusion pass is match + check + rewrite, with reasons for every decline.

Subclasses give the anchor op types to look at, a ``match`` that returns a
:class:`Match` or the reason (a string) the candidate was declined, and a
``rewrite`` that replaces the matched nodes. Each fusion's match is a typed
subclass of :class:`Match` holding what its rewrite reads
(``FusionPass[NormMatch]``). The base class walks the graph once,
records every near miss with its reason, and can stop after the first
``max_matches`` rewrites, which lets the pass-debugging tool bisect over match
sites.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.pipeline.manager import Pass, PassResult

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Match:
    """A site a fusion will rewrite: its nodes (removed by the rewrite) and the kind of fusion.

    A fusion subclasses it with typed fields for what its rewrite reads.
    """

    nodes: list[Node]
    #: The stat key of this rewrite when it differs by site ("gelu_tanh"); "" counts it under the pass's ``stat``.
    kind: str = ""

    @property
    def site(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def values(self) -> dict[str, Any]:
        """The match's fields by name, live (setting one sets the field): for tools and tests that patch a match."""
        return vars(self)


M = TypeVar("M", bound=Match)


@dataclass
class NearMiss:
    """A candidate that looked like the pattern but was declined, and why."""

    anchor: str
    op: str
    reason: str


class FusionPass(Pass, Generic[M]):
    """Base of fusions; see the module docstring."""

    #: Op types a match starts from.
    anchors: ClassVar[tuple[str, ...]] = ()
    #: Stat key counting rewrites (e.g. "layer_norm"); kind-specific keys come from Match.kind.
    stat: ClassVar[str] = "fused"
    supports_max_matches: ClassVar[bool] = True

    def __init__(self, max_matches: int | None = None) -> None:
        self.max_matches = max_matches
        self.near_misses: list[NearMiss] = []
        self.sites: list[list[str]] = []

    def match(self, graph: Graph, anchor: Node) -> M | str:
        raise NotImplementedError

    def rewrite(self, graph: Graph, m: M) -> None:
        raise NotImplementedError

    def prepare(self, graph: Graph) -> None:
        """Hook run once before matching (e.g. to raise the opset)."""

    def run(self, graph: Graph) -> PassResult:
        self.near_misses = []
        self.sites = []
        stats: dict[str, int] = {}
        consumed: set[int] = set()
        prepared = False
        for anchor in graph.nodes:
            if anchor.op not in self.anchors or id(anchor) in consumed:
                continue
            m = self.match(graph, anchor)
            if isinstance(m, str):
                self.near_misses.append(NearMiss(anchor.name, anchor.op, m))
                log.debug("%s: declined at %s: %s", self.name, anchor.name, m)
                continue
            if any(id(n) in consumed for n in m.nodes):
                continue
            if self.max_matches is not None and len(self.sites) >= self.max_matches:
                stats["skipped"] = stats.get("skipped", 0) + 1
                continue
            if not prepared:
                self.prepare(graph)
                prepared = True
            self.sites.append(m.site)
            consumed.update(id(n) for n in m.nodes)
            self.rewrite(graph, m)
            key = m.kind or self.stat
            stats[key] = stats.get(key, 0) + 1
            log.debug("%s: fused %s", self.name, m.site)
        if self.near_misses:
            stats["declined"] = len(self.near_misses)
        return PassResult(graph, bool(self.sites), stats)


def only_consumer(tensor: Tensor, node: Node) -> bool:
    """True if ``node`` is the single consumer of ``tensor`` (so it can be fused away)."""
    return len(tensor.outputs) == 1 and tensor.outputs[0] is node
