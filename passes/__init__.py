"""The rewrite passes, one per module; this list is the registry (no magic)."""

from __future__ import annotations

from passes.cleanup import Cleanup
from qgraph.pass_manager import Pass

#: Every built-in pass, by command-line name.
ALL_PASSES: dict[str, type[Pass]] = {p.name: p for p in (Cleanup,)}

__all__ = ["ALL_PASSES", "Cleanup"]
