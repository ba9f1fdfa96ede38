"""The default rewrite pipeline, and ``optimize()``.

The pipeline is one declared tuple of pass names, each with the reason it is
there. The manager checks the order; nothing here reorders passes.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qgraph.errors import QGraphError, UnknownPassError
from qgraph.ir.graph import Graph
from qgraph.ir.validate import is_custom_domain
from qgraph.pipeline.manager import Pass, PassManager, Report

log = logging.getLogger(__name__)

#: The default pipeline, in order.
DEFAULT_PIPELINE: tuple[str, ...] = (
    "fold-constants",  # exporters leave Constant nodes and arithmetic on constants behind
    "fuse-layer-norm",  # TorchScript below opset 17 decomposes LayerNorm into 9 ops
    "fuse-gelu",  # both exporters decompose GPT-2's gelu_new (Pow, Tanh, ...)
    "cleanup",  # drop what the fusions left before attention is matched
    "retain-kv-cache",  # growing cache -> fixed ctx_len cache kept between steps
    "cleanup",  # the old mask machinery and cache concats are dead now
    "pin-static-shapes",  # accelerators need static shapes (only with batch_size and seq_len)
    "cleanup",  # shape arithmetic folded away leaves dead nodes
)
#: The default context length (tokens in the cache), capped by the model's maximum.
DEFAULT_CTX_LEN = 128


class OptionError(QGraphError):
    """An option of the pipeline (ctx_len, batch size, seq_len) is out of range."""


@dataclass
class Options:
    """What the option-taking passes need."""

    ctx_len: int = DEFAULT_CTX_LEN
    batch_size: int | None = None
    seq_len: int | None = None

    @property
    def pinned(self) -> bool:
        return self.batch_size is not None and self.seq_len is not None


def _registry() -> dict[str, type[Pass]]:
    from passes import ALL_PASSES

    return {**ALL_PASSES, **_EXTRA}


_EXTRA: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Make a third-party pass class available by its ``name`` (``--passes``)."""
    if not cls.name:
        raise UnknownPassError(f"{cls.__name__} has no name; set the class attribute 'name'")
    _EXTRA[cls.name] = cls
    return cls


def available_passes() -> list[str]:
    return sorted(_registry())


def _factories(opts: Options) -> dict[str, Callable[[], Pass]]:
    from passes import PinStaticShapes, RetainKvCache

    def pin() -> Pass:
        if not opts.pinned:
            raise UnknownPassError("pin-static-shapes needs both a batch size and a seq_len (--batch-size B --seq-len S)")
        return PinStaticShapes(batch_size=opts.batch_size, seq_len=opts.seq_len, ctx_len=opts.ctx_len)  # type: ignore[arg-type]

    return {"retain-kv-cache": lambda: RetainKvCache(ctx_len=opts.ctx_len), "pin-static-shapes": pin}


def build_passes(names: Sequence[str] | None, opts: Options) -> list[Pass]:
    """Instantiate passes by name; ``None`` means the default pipeline.

    The default pipeline leaves out pin-static-shapes unless both batch size
    and seq_len are given.
    """
    registry = _registry()
    factories = _factories(opts)
    if names is None:
        names = []
        for n in DEFAULT_PIPELINE:
            if n == "pin-static-shapes" and not opts.pinned:
                continue
            if not (n == "cleanup" and names and names[-1] == "cleanup"):  # back-to-back cleanups do nothing twice
                names.append(n)
    out: list[Pass] = []
    for name in names:
        if name in factories:
            out.append(factories[name]())
        elif name in registry:
            out.append(registry[name]())
        else:
            raise UnknownPassError(f"unknown pass '{name}'; available: {', '.join(sorted(registry))}")
    return out


def model_max_length(graph: Graph) -> int | None:
    """The number of rows of the position embedding that ``position_ids`` indexes."""
    for t in graph.inputs:
        if t.name != "position_ids":
            continue
        for node in t.outputs:
            if node.op == "Gather" and node.inputs[1] is t and graph.is_constant(node.inputs[0]):
                shape = node.inputs[0].shape
                if shape:
                    return int(shape[0])
    return None


def default_ctx_len(graph: Graph) -> int:
    limit = model_max_length(graph)
    return min(DEFAULT_CTX_LEN, limit) if limit else DEFAULT_CTX_LEN


def optimize(
    graph: Graph,
    passes: Sequence[str | Pass] | None = None,
    *,
    ctx_len: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    check: bool = False,
) -> Report:
    """Rewrite ``graph`` in place with ``passes`` (default: the default pipeline).

    ``ctx_len`` defaults to 128, or to the model's maximum length if smaller.
    With ``batch_size`` and ``seq_len`` the shapes are pinned too. In check
    mode the graph is verified after every pass. Returns the pass report.
    """
    for what, value in (("ctx_len", ctx_len), ("batch size", batch_size), ("seq_len", seq_len)):
        if value is not None and value < 1:
            raise OptionError(f"{what} must be at least 1, got {value}")
    opts = Options(ctx_len=ctx_len or default_ctx_len(graph), batch_size=batch_size, seq_len=seq_len)
    if passes is None:
        instances = build_passes(None, opts)
    else:
        instances = [p if isinstance(p, Pass) else build_passes([p], opts)[0] for p in passes]
    custom = collections.Counter(f"{n.domain}.{n.op}" for n in graph.nodes if is_custom_domain(n.domain))
    result, report = PassManager(instances, check=check).run(graph)
    if result is not graph:
        graph.adopt(result)
    if custom:
        # Custom ops are legal ONNX: every pass leaves them alone, and the user should know.
        ops = ", ".join(f"{op} x{k}" if k > 1 else op for op, k in sorted(custom.items()))
        report.notes.append(f"{sum(custom.values())} node(s) from custom domains left untouched: {ops}")
    return report
