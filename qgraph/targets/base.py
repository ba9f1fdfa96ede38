"""The interface every device target implements.

A target fills its slots of the declared pipeline with its own passes
(``slots``; :mod:`qgraph.pipeline.stages`), turns each pinned specialization
graph into files in the artifact directory (``compile_spec``), finishes the
directory (``finish``: e.g. one shared weights file), and later opens a
session on a compiled file (``create_session``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qgraph.errors import QGraphError
from qgraph.ir.graph import Graph

if TYPE_CHECKING:
    import onnxruntime as ort

    from qgraph.artifact.manifest import Specialization


class TargetError(QGraphError):
    """A target was unknown, given bad options, or could not build or run."""


class Target:
    """The interface every target implements."""

    name = ""
    #: The runtime may bind each past input and its _RetainedState output to one buffer.
    inplace_kv = True
    #: The symbolic optimized graph stays in the artifact (qaic compiles it itself).
    keeps_base = False
    defaults: dict[str, Any] = {}
    #: The passes this target puts in the pipeline's slots ("legalize", "final"; see qgraph.pipeline.stages).
    slots: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    #: A dry run writes the device compiler's inputs and prints its command (qaic); other targets compile here.
    dry_runs = False

    def check_dry_run(self, dry_run: bool) -> None:
        """Rule: only a target whose compiler runs elsewhere takes a dry run (one message, for the CLI and the API)."""
        if dry_run and not self.dry_runs:
            raise TargetError(f"--dry-run is for --target qaic (it writes qaic-exec's inputs and prints its command); "
                              f"--target {self.name} compiles here, so drop --dry-run")  # fmt: skip

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TargetError(f"unknown option(s) {unknown} for target {self.name}; it takes {sorted(self.defaults)}")
        return {**self.defaults, **{k: v for k, v in options.items() if v is not None}}

    def compile_spec(self, graph: Graph, out_dir: Path, spec: Specialization, options: dict[str, Any], *, dry_run: bool,
                     quantize: str | None = None) -> None:  # fmt: skip
        """Build ``spec`` from its pinned ``graph`` into ``out_dir``; ``quantize``: a mode the target quantizes itself
        (qnn's w8a16; the weight-only modes are a pass, already run)."""
        raise NotImplementedError

    def finish(self, out_dir: Path, base: Path, specs: list[Specialization], options: dict[str, Any], *, dry_run: bool,
               progress: Callable[[str], None] | None) -> dict[str, Any] | None:  # fmt: skip
        """Called once after every specialization is compiled; may return extra manifest fields (``fed_weights``)."""

    def create_session(self, path: Path, options: dict[str, Any], *, threads: int | None = None) -> ort.InferenceSession:
        raise TargetError(f"target {self.name} has no runtime in qgraph")
