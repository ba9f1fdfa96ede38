"""Passes by name: the built-in ones (``passes.ALL_PASSES``), those registered at run time, and their instances.

The passes that take options (retain-kv-cache and fuse-rotary: ctx_len; pin-static-shapes: the
batch size, seq_len and ctx_len; quantize-weights: the mode and block size) are made from the resolved
:class:`~qgraph.pipeline.options.Options`; every other pass from its class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from qgraph.errors import OptionError, UnknownPassError
from qgraph.ir.graph import Graph
from qgraph.pipeline.manager import Pass, validate_order
from qgraph.pipeline.options import WEIGHT_ONLY_MODES, Options
from qgraph.pipeline.stages import default_pipeline

_EXTRA: dict[str, type[Pass]] = {}


def _registry() -> dict[str, type[Pass]]:
    # The passes package imports the pass protocol from this package: it is imported when first needed.
    from passes import ALL_PASSES

    return {**ALL_PASSES, **_EXTRA}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Make a third-party pass class available by its ``name`` (``--passes``)."""
    if not cls.name:
        raise UnknownPassError(f"{cls.__name__} has no name; set the class attribute 'name'")
    _EXTRA[cls.name] = cls
    return cls


def available_passes() -> list[str]:
    return sorted(_registry())


def _factories(opts: Options) -> dict[str, Callable[[], Pass]]:
    from passes import FuseRotary, PinStaticShapes, QuantizeWeights, RetainKvCache

    def pin() -> Pass:
        if not opts.pinned:
            raise UnknownPassError("pin-static-shapes needs both a batch size and a seq_len (--batch-size B --seq-len S)")
        return PinStaticShapes(batch_size=opts.batch_size, seq_len=opts.seq_len, ctx_len=opts.ctx_len)  # type: ignore[arg-type]

    def quantize() -> Pass:
        if not opts.weight_only:
            raise UnknownPassError(f"quantize-weights needs --quantize {' or '.join(WEIGHT_ONLY_MODES)}")
        return QuantizeWeights(mode=opts.quantize, block_size=opts.quant_block_size, vocab_mode=opts.quant_vocab)  # type: ignore[arg-type]

    return {
        "retain-kv-cache": lambda: RetainKvCache(ctx_len=opts.ctx_len),
        "pin-static-shapes": pin,
        "fuse-rotary": lambda: FuseRotary(positions=opts.ctx_len),
        "quantize-weights": quantize,
    }


def check_quantizable(graph: Graph, opts: Options) -> None:
    """Rule: a weight-only ``--quantize`` is asked of a graph it can act on (:func:`passes.quantize_weights.unquantizable`)."""
    if opts.weight_only:
        from passes.quantize_weights import unquantizable

        if (why := unquantizable(graph)) is not None:
            raise OptionError(f"--quantize {opts.quantize}: {why}")


def build_passes(names: Sequence[str] | None, opts: Options) -> list[Pass]:
    """Instantiate passes by name; ``None`` means the default pipeline (pinning only when ``opts`` pins)."""
    registry = _registry()
    factories = _factories(opts)
    out: list[Pass] = []
    for name in default_pipeline(opts.pinned, opts.weight_only) if names is None else names:
        if name in factories:
            out.append(factories[name]())
        elif name in registry:
            out.append(registry[name]())
        else:
            raise UnknownPassError(f"unknown pass '{name}'; available: {', '.join(sorted(registry))}")
    return out


def check_order(names: Sequence[str], opts: Options, initial_facts: Iterable[str] = ()) -> list[Pass]:
    """The passes of ``names``, after :func:`~qgraph.pipeline.manager.validate_order` accepted their order
    (:class:`~qgraph.errors.PassOrderError` names the missing fact otherwise); nothing has run."""
    passes = build_passes(names, opts)
    validate_order(passes, initial_facts)
    return passes
