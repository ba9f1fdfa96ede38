"""Export a Hugging Face causal LM (any family in :mod:`qgraph.frontend.families`) to ONNX, unchanged (the raw export).

The raw export is the plain model with a concat-grown KV cache and these IOs:

* inputs ``input_ids``, ``attention_mask``, ``position_ids`` (int64), then
  ``past_key.{i}``, ``past_value.{i}`` per layer ([batch, num_kv_heads, past_len, head_dim]);
  ``input_ids`` and ``position_ids`` are [batch, seq_len], ``attention_mask`` is
  [batch, total_len] with total_len = past_len + seq_len, as Hugging Face takes it;
* outputs ``logits`` [batch, seq_len, vocab], then ``present_key.{i}``,
  ``present_value.{i}`` per layer ([batch, num_kv_heads, total_len, head_dim]).

Every input and output dimension is either a number or one of ``batch``,
``seq_len``, ``past_len``, ``total_len``: the exporters name some dimensions
themselves (dynamo's ``s53`` or ``past_len + seq_len``), so they are renamed
after export. A prefill passes past tensors with past_len = 0.

At opset 23 and newer the dynamo exporter writes attention as the standard ONNX
``Attention`` op (one per layer, reading the concatenated caches as K and V,
with a bool mask); TorchScript keeps MatMul/Softmax. The passes take both.

Passing a ``DynamicCache`` to either exporter fails, so a small wrapper module
takes flat past tensors, builds the cache inside and returns flat presents.
torch is imported inside the functions: the core package must import without it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qgraph.errors import ExportError, InvalidModelError
from qgraph.frontend.families import ModelSpec, spec_of
from qgraph.frontend.hf import ModelSource, load_model, require_hf
from qgraph.ir.contract import MAX_POSITIONS_KEY, MAX_POSITIONS_WHY_KEY

if TYPE_CHECKING:
    import torch

    from qgraph.ir.graph import Graph

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
#: The dtypes a model is exported in (its weights, caches and logits): what ONNX Runtime's CPU and QNN HTP run.
DTYPES = ("float32", "float16")
DEFAULT_DTYPE = "float32"
#: The dynamo exporter emits opset 18 and newer only.
DYNAMO_MIN_OPSET = 18
DIM_NAMES = ("batch", "seq_len", "past_len", "total_len")
# Example sizes to trace with: distinct, and > 1 so no exporter specializes a
# dimension to 0 or 1 or merges two dimensions whose example sizes are equal.
# past_len > 0 matters too: with an empty past the cache's first update skips
# the concat and a traced graph would not grow the cache.
_BATCH, _SEQ, _PAST = 2, 5, 7

_NOISY_LOGGERS = {"torch.onnx": logging.ERROR, "onnx_ir": logging.WARNING, "onnxscript": logging.WARNING}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote."""

    path: Path
    size_bytes: int  # graph file plus its external data file, if any
    exporter: str
    opset: int
    spec: ModelSpec
    seconds: float
    dtype: str = DEFAULT_DTYPE


def check_dtype(dtype: str) -> None:
    """Rule: a model is exported in one of :data:`DTYPES`."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be {' or '.join(DTYPES)}, not {dtype!r}; pass --dtype {' or --dtype '.join(DTYPES)}")


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the raw export, in order."""
    kv = [f"{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids"] + [f"past_{n}" for n in kv], ["logits"] + [f"present_{n}" for n in kv]


def io_shapes(num_layers: int, num_kv_heads: int, head_dim: int, vocab_size: int) -> dict[str, list[int | str]]:
    """The contract's shape of every input and output, by name."""
    inputs, outputs = io_names(num_layers)
    shapes: dict[str, list[int | str]] = {
        "input_ids": ["batch", "seq_len"],
        "attention_mask": ["batch", "total_len"],
        "position_ids": ["batch", "seq_len"],
        "logits": ["batch", "seq_len", vocab_size],
    }
    shapes.update({n: ["batch", num_kv_heads, "past_len", head_dim] for n in inputs[3:]})
    shapes.update({n: ["batch", num_kv_heads, "total_len", head_dim] for n in outputs[1:]})
    return shapes


def _flat_cache_wrapper(model: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """A module taking flat past tensors and returning (logits, *flat presents)."""
    torch, transformers = require_hf()

    class FlatCacheLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
            # Every layer a full cache, even for a sliding-window model: its window layers keep only the last
            # window - 1 positions, which torch.export can only trace as a guard past_len < window (Mistral
            # failed so). Within the window they are the same, and qgraph refuses a ctx_len past it.
            cache = transformers.DynamicCache()
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                return_dict=True,
            )
            presents = [t for layer in out.past_key_values.layers[:num_layers] for t in (layer.keys, layer.values)]
            return (out.logits, *presents)

    return FlatCacheLM().eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporters' warnings and prints out of the user's console.

    Nothing is lost: warnings and stdout go to this module's DEBUG log. Errors
    are exceptions and pass through.
    """
    _, transformers = require_hf()
    # torch.onnx warns "torchvision is not installed"; onnx_ir logs every
    # deduplicated initializer at INFO.
    loggers = {logging.getLogger(n): level for n, level in _NOISY_LOGGERS.items()}
    old_levels = {lg: lg.level for lg in loggers}
    old_verbosity = transformers.logging.get_verbosity()
    stdout = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout), _captured_fds() as native:
        warnings.simplefilter("always")
        for lg, level in loggers.items():
            lg.setLevel(max(level, lg.getEffectiveLevel()))
        transformers.logging.set_verbosity_error()
        try:
            yield
        finally:
            for lg, level in old_levels.items():
                lg.setLevel(level)
            transformers.logging.set_verbosity(old_verbosity)
    for w in caught:
        log.debug("exporter warning: %s: %s", w.category.__name__, str(w.message).splitlines()[0])
    for line in [*stdout.getvalue().splitlines(), *native()]:
        log.debug("exporter: %s", line)


@contextlib.contextmanager
def _captured_fds() -> Iterator[Callable[[], list[str]]]:
    """Send what is written to file descriptors 1 and 2 meanwhile to a file: torch prints from C++ and through its own
    handlers (a failed trace dumps its whole graph: hundreds of lines). Yields the function that returns the lines
    once the block is done. Where the descriptors cannot be redirected, nothing is captured."""
    lines: list[str] = []
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:
        yield lambda: lines
        return
    with tempfile.TemporaryFile() as capture:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()  # type: ignore[union-attr]
        os.dup2(capture.fileno(), 1)
        os.dup2(capture.fileno(), 2)
        try:
            yield lambda: lines
        finally:
            for stream in (sys.__stdout__, sys.__stderr__):
                with contextlib.suppress(Exception):
                    stream.flush()  # type: ignore[union-attr]
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            capture.seek(0)
            lines.extend(capture.read().decode(errors="replace").splitlines())


#: ANSI colour codes (torch.onnx colours its messages).
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _failure_reason(e: BaseException) -> str:
    """One line on why an exporter failed: the first line of the innermost exception it raised from (torch.export's
    own message is a generic 'Failed to export'; its cause names the expression it could not trace)."""
    root, seen = e, {id(e)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        root = nxt
    lines = [_ANSI.sub("", line).strip() for line in str(root).splitlines()]
    first = next((line for line in lines if line), "")
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(root).__name__}: {first}" if first else type(root).__name__


def _run_exporter(
    wrapper: torch.nn.Module,
    example: tuple[Any, ...],
    path: Path,
    exporter: str,
    opset: int | None,
    num_layers: int,
) -> None:
    torch, _ = require_hf()
    inputs, outputs = io_names(num_layers)
    if exporter == "dynamo":
        Dim = torch.export.Dim
        batch, seq, past = Dim("batch", min=1), Dim("seq_len", min=1), Dim("past_len", min=0)
        # attention_mask's length is past_len + seq_len, which torch.export cannot
        # write as a Dim; a free dimension is renamed after export.
        dynamic_shapes = {
            "input_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: Dim.DYNAMIC},
            "position_ids": {0: batch, 1: seq},
            "past": tuple({0: batch, 2: past} for _ in range(2 * num_layers)),
        }
        torch.onnx.export(
            wrapper, example, str(path), dynamo=True, opset_version=opset, verbose=False,
            input_names=inputs, output_names=outputs, dynamic_shapes=dynamic_shapes,
        )  # fmt: skip
    else:
        shapes = io_shapes(num_layers, 0, 0, 0)
        dynamic_axes = {name: {i: d for i, d in enumerate(dims) if isinstance(d, str)} for name, dims in shapes.items()}
        torch.onnx.export(
            wrapper, example, str(path), dynamo=False, opset_version=opset, verbose=False,
            input_names=inputs, output_names=outputs, dynamic_axes=dynamic_axes,
        )  # fmt: skip


def fix_dim_names(graph: Graph, expected: dict[str, list[int | str]]) -> dict[str, str]:
    """Rename exporter-made dimension names to the contract's, everywhere in ``graph``.

    Checks every input and output against ``expected`` and raises
    :class:`ExportError` if the exporter fixed a dimension that should be
    dynamic, or gave one name to two different dimensions. Returns the renames.
    """
    io = {t.name: t for t in graph.inputs + graph.outputs}
    if sorted(io) != sorted(expected):
        raise ExportError(f"the export has inputs/outputs {sorted(io)}, expected {sorted(expected)}")
    renames: dict[str, str] = {}
    for name, want in expected.items():
        have = list(io[name].shape or [None] * len(want))
        if len(have) != len(want):
            raise ExportError(f"'{name}' has rank {len(have)}, expected {len(want)} ({want})")
        for axis, (h, w) in enumerate(zip(have, want, strict=True)):
            if isinstance(w, str) and isinstance(h, int):
                raise ExportError(f"the exporter fixed dimension {axis} of '{name}' to {h}; it should be dynamic ({w})")
            if isinstance(w, int) and isinstance(h, int) and h != w:
                raise ExportError(f"dimension {axis} of '{name}' is {h}, expected {w}")
            if isinstance(w, str) and isinstance(h, str):
                if renames.setdefault(h, w) != w:
                    raise ExportError(f"the exporter gave '{renames[h]}' and '{w}' one name ('{h}'); they must stay distinct")
    # Intermediate shapes use the exporter's names too; keep them consistent.
    for tensor in graph.tensors().values():
        shape = getattr(tensor, "shape", None)
        if shape is not None and any(isinstance(d, str) and d in renames for d in shape):
            tensor.shape = [renames.get(d, d) if isinstance(d, str) else d for d in shape]
    for name, want in expected.items():
        io[name].shape = list(want)
    return {old: new for old, new in renames.items() if old != new}


def _check_exporter(exporter: str, opset: int | None) -> None:
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and opset is not None and opset < DYNAMO_MIN_OPSET:
        raise ExportError(
            f"the dynamo exporter starts at opset {DYNAMO_MIN_OPSET} (asked for {opset}); use --exporter torchscript for older opsets"
        )


def export_model(
    model: str | ModelSource | torch.nn.Module,
    out: str | Path,
    *,
    exporter: str | None = None,
    opset: int | None = None,
    dtype: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export ``model`` (a model name, see :func:`qgraph.hf.resolve_model`, or a
    loaded causal LM of a known family) to the ONNX file ``out``, unchanged.

    ``exporter`` is ``dynamo`` (opset 18 and newer) or ``torchscript`` (None: the model's, ``ModelSpec.exporter``:
    dynamo unless torch.export cannot trace it); ``opset``
    defaults to the exporter's own default. ``dtype`` (one of :data:`DTYPES`) is
    what a named model is loaded in (default float32); a loaded model is exported
    in its own dtype, which ``dtype`` must then match. Weights over 64 MB go to
    ``<out>.data``. Both files are written under temporary names and renamed.
    """
    from qgraph.ir.graph import EXTERNAL_DATA_THRESHOLD, Graph

    def say(line: str) -> None:
        log.info("%s", line)
        if progress is not None:
            progress(line)

    if exporter is not None:
        _check_exporter(exporter, opset)
    if dtype is not None:
        check_dtype(dtype)
    torch, _ = require_hf()
    start = time.perf_counter()
    if isinstance(model, (str, ModelSource)):
        say(f"loading model {model}" + (f" in {dtype}" if dtype else ""))
        model = load_model(model, dtype or DEFAULT_DTYPE)
    spec = spec_of(getattr(model, "config", None), f"the {type(model).__name__}")
    if exporter is None:
        exporter = spec.exporter
        _check_exporter(exporter, opset)
    num_layers, num_kv_heads, head_dim, vocab = spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.vocab_size
    weight_dtype = next(model.parameters()).dtype
    have = str(weight_dtype).removeprefix("torch.")
    if dtype is not None and have != dtype:
        # Converting here would change the caller's module in place (torch's .to() does).
        raise ExportError(f"the model is {have}, not the {dtype} asked for; convert it first (model.to(torch.{dtype})) or leave dtype out")
    if spec.max_positions < _PAST + _SEQ:
        why = (f"its sliding attention window is {spec.sliding_window} positions" if spec.max_positions == spec.sliding_window
               else f"its longrope rotary switches factors at {spec.rope_limit} positions" if spec.max_positions == spec.rope_limit
               else f"the model has {spec.max_positions} positions")  # fmt: skip
        raise ExportError(f"{why}; export traces {_PAST + _SEQ} positions, so it needs at least that many")

    example = (
        torch.zeros(_BATCH, _SEQ, dtype=torch.int64),
        torch.ones(_BATCH, _PAST + _SEQ, dtype=torch.int64),
        torch.arange(_PAST, _PAST + _SEQ, dtype=torch.int64).expand(_BATCH, _SEQ).contiguous(),
        *(torch.zeros(_BATCH, num_kv_heads, _PAST, head_dim, dtype=weight_dtype) for _ in range(2 * num_layers)),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from qgraph.artifact.atomic import remove_stale_temps

    remove_stale_temps(out.parent, (".qgraph-export-",))  # left by a killed export
    was_training = model.training
    with tempfile.TemporaryDirectory(prefix=f".qgraph-export-{os.getpid()}-", dir=out.parent) as tmp:
        raw = Path(tmp) / out.name
        say(f"exporting with the {exporter} exporter (opset {opset or 'default'})")
        try:
            with _quiet(), torch.no_grad():
                _run_exporter(_flat_cache_wrapper(model.eval(), num_layers), example, raw, exporter, opset, num_layers)
        except Exception as e:
            other = "torchscript" if exporter == "dynamo" else "dynamo"
            raise ExportError(f"the {exporter} exporter failed ({_failure_reason(e)}); try --exporter {other}") from e
        finally:
            model.train(was_training)

        try:
            graph = Graph.load(raw)
        except InvalidModelError as e:
            # e.g. TorchScript on a float16 GPT-2: a float32 residual next to float16 LayerNormalization weights.
            why = str(e).removeprefix(f"{raw}: ").splitlines()[0]
            other = "torchscript" if exporter == "dynamo" else "dynamo"
            raise ExportError(f"the {exporter} exporter wrote an invalid graph ({why}); try --exporter {other}") from e
        got_opset = graph.opset()
        if opset is not None and got_opset != opset:
            raise ExportError(f"the {exporter} exporter wrote opset {got_opset}, not the opset {opset} asked for; try another opset")
        say("naming dimensions " + ", ".join(DIM_NAMES))
        renames = fix_dim_names(graph, io_shapes(num_layers, num_kv_heads, head_dim, vocab))
        log.debug("renamed dimensions %s", renames)
        # The context the model takes (capped by a sliding window or a longrope switch): compiles of this file read it.
        graph.metadata[MAX_POSITIONS_KEY] = str(spec.max_positions)
        if spec.max_positions_why() is not None:
            graph.metadata[MAX_POSITIONS_WHY_KEY] = spec.max_positions_why()
        external = graph.weights_nbytes() > EXTERNAL_DATA_THRESHOLD
        say(f"saving {out}" + (f" (weights in {out.name}.data)" if external else ""))
        graph.save(out, external=external)
    data = out.with_name(out.name + ".data")
    if not external:
        data.unlink(missing_ok=True)  # left by an earlier, larger export to this path
    size = out.stat().st_size + (data.stat().st_size if external else 0)
    result = ExportResult(out, size, exporter, int(got_opset or 0), spec, time.perf_counter() - start, have)
    log.info("exported %s: %.1f MB, opset %s, %.1f s", out, size / 1e6, result.opset, result.seconds)
    return result
