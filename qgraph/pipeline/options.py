"""The options of a compile (and of an optimize): one typed object, resolved once against the model.

:meth:`Options.resolve` takes what a caller asked for (None: the default),
fills each default from the one place it is written (below), checks every rule
once, and returns the object that compile, the targets and the runtime then
receive unchanged; the manifest records it once and the runtime reads it back.
Each rule's message is written once, here.

The model's maximum positions come from its config (``ModelSpec.max_positions``)
where the caller has the model (the API), else from the exported graph's
position table (:func:`qgraph.pipeline.optimize.graph_max_positions`) where
only an ONNX file is given.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from qgraph.errors import GenerationError, OptionError

#: Tokens the KV cache holds when not asked; capped by the model's maximum positions.
DEFAULT_CTX_LEN = 128
#: Tokens of a prompt chunk (the prefill specialization's width) when not asked; capped by ctx_len.
DEFAULT_PREFILL_SEQ_LEN = 32
#: Rows a compiled artifact runs together when not asked.
DEFAULT_BATCH_SIZE = 1
#: Tokens generate() adds to each prompt when not asked.
DEFAULT_MAX_NEW_TOKENS = 32
#: Weight-only quantization modes (``--quantize``): int8/int4 MatMulNBits for cpu (or a target-free optimize);
#: ``w8a16`` (QDQ: int8 weights, int16 activations) for qnn.
QUANTIZE_MODES = ("int8", "int4", "w8a16")
#: The modes the quantize-weights pass makes (weight-only blocks, ONNX Runtime's MatMulNBits).
WEIGHT_ONLY_MODES = ("int8", "int4")
#: The targets (None: no target, ``qgraph optimize``) that take each quantization mode.
QUANTIZE_TARGETS: dict[str, tuple[str | None, ...]] = {"int8": (None, "cpu"), "int4": (None, "cpu"), "w8a16": ("qnn",)}
#: Weights per quantization block along the reduction axis when not asked (``--quant-block-size``).
DEFAULT_QUANT_BLOCK_SIZE = 32
#: The block sizes ONNX Runtime's block quantizer (MLAS) and MatMulNBits take: powers of two in this range.
MIN_QUANT_BLOCK_SIZE, MAX_QUANT_BLOCK_SIZE = 16, 256
#: The vocabulary's modes (``--quant-vocab``; its projection and the token embedding): int8 or int4 blocks, or
#: ``int4-rescore``: int4 blocks, the top candidates of each row of logits recomputed from int8 blocks, and the
#: embedding in int8 (passes/quantize_weights.py).
QUANT_VOCAB_MODES = ("int8", "int4", "int4-rescore")
#: The vocabulary's mode under each weight-only mode when not asked: int4 in the vocabulary costs most of int4's
#: accuracy, which rescoring its candidates in int8 gives back at int4's bytes per step (docs/quantization.md).
DEFAULT_QUANT_VOCAB = {"int8": "int8", "int4": "int4-rescore"}


def default_quant_vocab(quantize: str | None) -> str:
    """The vocabulary's mode under ``quantize`` when not asked (int8 when not weight-only quantized)."""
    return DEFAULT_QUANT_VOCAB.get(quantize or "", "int8")


#: How a message names each count, and the flag that sets it.
_NAMED = {
    "ctx_len": ("ctx_len", "--ctx-len"),
    "prefill_seq_len": ("the prefill length", "--prefill-seq-len"),
    "batch_size": ("the batch size", "--batch-size"),
    "seq_len": ("seq_len", "--seq-len"),
    "max_new_tokens": ("max_new_tokens", "--max-new-tokens"),
}


class ChecksOptions(Protocol):
    """A target, as far as its options go (``qgraph.targets.base.Target``)."""

    @property
    def name(self) -> str: ...

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]: ...


def check_at_least_one(name: str, value: int | None) -> None:
    """Rule: a count (``ctx_len``, ``prefill_seq_len``, ``batch_size``, ``seq_len``, ``max_new_tokens``) is at least 1."""
    if value is None:
        return
    what, flag = _NAMED[name]
    try:
        operator.index(value)  # ints and numpy integers; not 2.5, not "3"
    except TypeError:
        raise OptionError(f"{what} must be an integer, got {value!r}; pass {flag} 1 or more") from None
    if isinstance(value, bool) or value < 1:
        raise OptionError(f"{what} must be at least 1, got {value}; pass {flag} 1 or more")


def check_pin(batch_size: int | None, seq_len: int | None) -> None:
    """Rule: pinning one graph (``optimize``, the pass debugger) takes both a batch size and a seq_len, or neither."""
    if (batch_size is None) != (seq_len is None):
        raise OptionError("give both --batch-size and --seq-len to pin shapes, or neither")


def check_quantize(quantize: str | None, block_size: int, target: str | None, vocab: str | None = None) -> None:
    """Rules: ``quantize`` is a known mode that ``target`` (None: a target-free optimize) takes; the block size is a
    power of two from 16 to 256 (ONNX Runtime's block quantizer and MatMulNBits take no other); the vocabulary's
    mode (None: the default) is one of :data:`QUANT_VOCAB_MODES`."""
    if vocab is not None and vocab not in QUANT_VOCAB_MODES:
        raise OptionError(f"unknown --quant-vocab {vocab!r}; use one of {', '.join(QUANT_VOCAB_MODES)}")
    if quantize is not None:
        if quantize not in QUANTIZE_MODES:
            raise OptionError(f"unknown --quantize {quantize!r}; use one of {', '.join(QUANTIZE_MODES)}")
        takes = QUANTIZE_TARGETS[quantize]
        if target not in takes:
            where = f"--target {target}" if target else "a graph without a target (qgraph optimize)"
            fits = [m for m, ts in QUANTIZE_TARGETS.items() if target in ts]
            instead = f"use --quantize {' or '.join(fits)} there" if fits else "drop --quantize (qaic quantizes with --mxfp6-matmul)"
            raise OptionError(f"--quantize {quantize} is for {' or '.join(t or 'optimize' for t in takes)}, not {where}; {instead}")
    if not MIN_QUANT_BLOCK_SIZE <= block_size <= MAX_QUANT_BLOCK_SIZE or block_size & (block_size - 1):
        raise OptionError(f"the quantization block size must be a power of two from {MIN_QUANT_BLOCK_SIZE} to {MAX_QUANT_BLOCK_SIZE}, got {block_size}; "
                          f"pass --quant-block-size {DEFAULT_QUANT_BLOCK_SIZE} (the default) or 64, 128")  # fmt: skip


def check_quant_details(quantize: str | None, quant_block_size: int | None, quant_vocab: str | None) -> None:
    """Rule: ``--quant-block-size`` and ``--quant-vocab`` (None: not asked) come with a ``--quantize`` (else nothing would
    read them, and the artifact would still record them). The defaults are no request (a manifest records them)."""
    if quantize is None:
        given = (("--quant-block-size", None if quant_block_size == DEFAULT_QUANT_BLOCK_SIZE else quant_block_size),
                 ("--quant-vocab", None if quant_vocab == default_quant_vocab(None) else quant_vocab))  # fmt: skip
        asked = [flag for flag, value in given if value is not None]
        if asked:
            raise OptionError(f"{' and '.join(asked)} {'go' if len(asked) > 1 else 'goes'} with --quantize; "
                              f"add --quantize {' or '.join(WEIGHT_ONLY_MODES)}, or drop {'them' if len(asked) > 1 else 'it'}")  # fmt: skip


def check_prompts(prompts: Sequence[Sized], ctx_len: int | None) -> None:
    """Rules: no prompt is empty, and each leaves room to generate in ``ctx_len`` (when given).

    ``prompts`` are token ids, or text (only its emptiness is checked then).
    """
    for i, p in enumerate(prompts):
        if not isinstance(p, Sized):
            raise GenerationError(f"prompt {i} is {type(p).__name__} {p!r}: a prompt is a text or a list of token ids "
                                  "(input_ids=[[1, 2, 3]]: one list per prompt)")  # fmt: skip
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty; give some text (or token ids) to continue")
        if ctx_len is not None and len(p) >= ctx_len:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens, which leaves no room to generate in ctx_len {ctx_len} (a prompt must be "
                f"shorter than ctx_len); shorten it or compile with ctx_len {len(p) + 1} or more"
            )


def check_token_ids(prompts: Sequence[Sequence[Any]], vocab_size: int) -> list[list[int]]:
    """Rules: token ids are integers (a float is refused, never truncated), each in ``[0, vocab_size)``.

    Returns the ids as lists of Python ints.
    """
    rows: list[list[int]] = []
    for i, p in enumerate(prompts):
        row: list[int] = []
        for t in p:
            try:
                row.append(operator.index(t))  # ints and numpy/torch integers; not 1.5, not "1"
            except TypeError:
                raise GenerationError(
                    f"prompt {i} has a token id that is not an integer: {t!r}; token ids are integers, e.g. 15496"
                ) from None
        out = [t for t in row if not 0 <= t < vocab_size]
        if out:
            raise GenerationError(f"prompt {i} has token ids outside the vocabulary (0..{vocab_size - 1}): {out[:5]}")
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Options:
    """What a compile is asked for, resolved (see the module docstring); make it with :meth:`resolve`.

    ``seq_len`` is ``qgraph optimize``'s pin width (``--seq-len``): with it one
    graph is pinned to [batch_size, seq_len]; a compile pins its
    specializations instead (prefill_seq_len tokens, and 1).
    """

    #: Tokens the KV cache holds (the whole context a step attends to).
    ctx_len: int
    #: Tokens of a prompt chunk: the prefill specialization's width.
    prefill_seq_len: int = DEFAULT_PREFILL_SEQ_LEN
    #: Rows run together.
    batch_size: int = DEFAULT_BATCH_SIZE
    #: optimize's pin width; None leaves the shapes symbolic.
    seq_len: int | None = None
    #: The target's options, its defaults filled in (``Target.check_options``).
    target_options: Mapping[str, Any] = field(default_factory=dict)
    #: Weight-only quantization (one of :data:`QUANTIZE_MODES`), or None for the model's own dtype.
    quantize: str | None = None
    #: Weights per quantization block along the reduction axis.
    quant_block_size: int = DEFAULT_QUANT_BLOCK_SIZE
    #: The vocabulary's mode (projection and token embedding) under weight-only quantization.
    quant_vocab: str = "int8"  # resolve() fills in the mode's default (default_quant_vocab)

    @property
    def pinned(self) -> bool:
        """True if optimize pins the shapes (both a batch size and a seq_len)."""
        # batch_size is None where qgraph.devtools.debug builds the object itself and does not pin.
        return self.batch_size is not None and self.seq_len is not None

    @property
    def weight_only(self) -> bool:
        """True if the quantize-weights pass runs (``quantize`` is int8 or int4)."""
        return self.quantize in WEIGHT_ONLY_MODES

    @classmethod
    def resolve(
        cls,
        *,
        ctx_len: int | None = None,
        prefill_seq_len: int | None = None,
        batch_size: int | None = None,
        seq_len: int | None = None,
        target_options: Mapping[str, Any] | None = None,
        target: ChecksOptions | None = None,
        max_positions: int | None = None,
        max_positions_why: str | None = None,
        cache_len: int | None = None,
        quantize: str | None = None,
        quant_block_size: int | None = None,
        quant_vocab: str | None = None,
    ) -> Options:
        """The options asked for (None: the default), made whole against the model and checked once.

        ``max_positions``: the model's maximum positions (None: unknown); it caps
        the default ctx_len and refuses a larger one (a default is capped where
        an asked value would be refused: the prefill length by ctx_len too);
        ``max_positions_why`` says why in the refusal where a window or a rotary switch set it.
        ``cache_len``: the cache length of a graph that is already retained,
        the default ctx_len.
        ``target``: checks ``target_options`` and fills the target's defaults; ``quantize`` is checked against it.
        Raises :class:`~qgraph.errors.OptionError` (or the target's error).
        """
        check_quant_details(quantize, quant_block_size, quant_vocab)
        if ctx_len is None:
            ctx_len = cache_len if cache_len is not None else min(DEFAULT_CTX_LEN, max_positions or DEFAULT_CTX_LEN)
        opts = cls(
            ctx_len=ctx_len,
            prefill_seq_len=min(DEFAULT_PREFILL_SEQ_LEN, ctx_len) if prefill_seq_len is None else prefill_seq_len,
            batch_size=DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
            seq_len=seq_len,
            target_options=dict(target_options or {}),
            quantize=quantize,
            quant_block_size=DEFAULT_QUANT_BLOCK_SIZE if quant_block_size is None else quant_block_size,
            quant_vocab=default_quant_vocab(quantize) if quant_vocab is None else quant_vocab,
        )
        opts.validate(max_positions=max_positions, max_positions_why=max_positions_why)
        check_quantize(opts.quantize, opts.quant_block_size, target.name if target is not None else None, opts.quant_vocab)
        if target is not None:
            opts = replace(opts, target_options=target.check_options(dict(opts.target_options)))
        return opts

    def validate(self, *, max_positions: int | None = None, max_positions_why: str | None = None) -> None:
        """Every rule on the numbers, each with its one message (:meth:`resolve` calls it)."""
        for name in ("ctx_len", "prefill_seq_len", "batch_size", "seq_len"):
            check_at_least_one(name, getattr(self, name))
        if max_positions is not None and self.ctx_len > max_positions:
            why = f"longer than {max_positions_why}" if max_positions_why else f"larger than the model's maximum length {max_positions}"
            raise OptionError(f"ctx_len {self.ctx_len} is {why}; use --ctx-len {max_positions} or less")
        if self.prefill_seq_len > self.ctx_len:
            raise OptionError(
                f"the prefill length {self.prefill_seq_len} is larger than ctx_len {self.ctx_len}; "
                f"use --prefill-seq-len {self.ctx_len} or less"
            )

    def check_cache_len(self, cache_len: int) -> None:
        """Rule: an already retained graph's cache holds ctx_len tokens (its length is fixed in the graph)."""
        if cache_len != self.ctx_len:
            raise OptionError(
                f"the graph's cache holds {cache_len} tokens but ctx_len {self.ctx_len} was asked; re-optimize with --ctx-len {self.ctx_len}"
            )

    def to_dict(self) -> dict[str, Any]:
        """What the manifest records (a compile's widths are its specializations: no seq_len)."""
        return {"ctx_len": self.ctx_len, "prefill_seq_len": self.prefill_seq_len, "batch_size": self.batch_size,
                "target_options": dict(self.target_options), "quantize": self.quantize,
                "quant_block_size": self.quant_block_size, "quant_vocab": self.quant_vocab}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Options:
        """The options a manifest recorded (:meth:`to_dict`), as they were resolved (a manifest from before
        quantization records none: not quantized; one from before ``quant_vocab`` quantized the vocabulary in its mode)."""
        return cls(ctx_len=int(data["ctx_len"]), prefill_seq_len=int(data["prefill_seq_len"]), batch_size=int(data["batch_size"]),
                   target_options=dict(data["target_options"]), quantize=data.get("quantize"),
                   quant_block_size=int(data.get("quant_block_size", DEFAULT_QUANT_BLOCK_SIZE)),
                   quant_vocab=data.get("quant_vocab") or data.get("quantize") or default_quant_vocab(None))  # fmt: skip
