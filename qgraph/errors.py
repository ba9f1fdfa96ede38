"""Typed errors that a user can cause.

Every error qgraph raises on purpose derives from :class:`QGraphError`. The CLI
prints such an error as one line (what went wrong, and what to do) and exits
with a non-zero code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class QGraphError(Exception):
    """Base class of the errors a user can cause; the message says what to do."""

    exit_code = 2


class ModelLoadError(QGraphError):
    """An ONNX file (or its external data) could not be read safely."""


class DiskSpaceError(QGraphError):
    """An output would not fit in the free space of its filesystem; nothing was written."""


class ModelSourceError(QGraphError):
    """A model id or folder could not be resolved to a Hugging Face model."""


class MissingDependencyError(QGraphError):
    """An optional dependency (an install extra) is needed but not installed."""


class ExportError(QGraphError):
    """Exporting a model to ONNX failed."""


class PassOrderError(QGraphError):
    """A pipeline's passes are in an order whose requirements are not met."""


class PassError(QGraphError):
    """A pass raised; the message names it and the passes that ran before."""


class GraphCheckError(QGraphError):
    """A graph failed verification (structure, checker or shape inference)."""


class UnknownPassError(QGraphError):
    """A pass name that no registered or loaded pass has."""


class RewriteError(QGraphError):
    """A rewrite found its pattern but cannot apply it safely to this graph."""


class StaticShapeError(QGraphError):
    """A graph's shapes could not be made fully static (a dimension stays symbolic)."""


class PlacementError(QGraphError):
    """A target's backend would leave nodes to the CPU and CPU fallback was not allowed.

    ``nodes`` lists them as (name, op type) pairs.
    """

    def __init__(self, message: str, nodes: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.nodes: list[tuple[str, str]] = list(nodes or [])


class CompileError(QGraphError):
    """A compile could not be done with these inputs or options."""


class GenerationError(QGraphError):
    """generate() was called with arguments it cannot honour."""


class OptionError(CompileError, GenerationError):
    """An option (ctx_len, prefill_seq_len, batch_size, seq_len, max_new_tokens) is out of range or does not fit the model.

    The options are checked once, by whichever entry point resolves them
    (optimize, compile, the API's compile and generate, the CLI); the error is a
    :class:`CompileError` and a :class:`GenerationError` so that callers that
    catch the error their entry point raised before keep catching it.
    """


class InvalidModelError(ModelLoadError):
    """An ONNX model is malformed (no graph, a cycle, a dangling input, absurd shapes, bad data)."""
