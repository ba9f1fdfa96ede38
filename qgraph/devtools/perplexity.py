"""Accuracy you can see: the perplexity of a text on a compiled model, and how often a quantized model's top-1
prediction is the unquantized one's (``qgraph perplexity``).

The model is compiled through the API (cached like ``generate``) and the text scored teacher-forced through the
runtime (:mod:`qgraph.runtime.perplexity`). With ``quantize`` the same model is compiled twice for the same target,
without quantization (the reference) and with it, and both runs score the same windows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from qgraph.errors import QGraphError
from qgraph.runtime.perplexity import PerplexityError, Scores, score, windows

Progress = Callable[[str], None]
#: The default stride is this fraction of ctx_len: each window after the first has ctx_len/2 tokens of context.
STRIDE_FRACTION = 2


@dataclass
class PerplexityReport:
    """What ``qgraph perplexity --json`` prints."""

    perplexity: float
    tokens: int  # tokens scored (the text's tokens but the first)
    top1_agreement: float  # this run's top-1 prediction equals the reference run's
    reference_perplexity: float  # the same model and target, not quantized
    top1_accuracy: float  # this run's top-1 prediction is the text's next token
    reference_top1_accuracy: float
    model: str
    target: str
    quantize: str | None
    quant_block_size: int | None  # int8 and int4 only
    quant_vocab: str | None  # int8 and int4 only: the vocabulary's mode
    ctx_len: int
    stride: int
    windows: int
    text: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        mode = f"--quantize {self.quantize}" if self.quantize else "not quantized"
        if self.quant_vocab:
            mode += f" --quant-vocab {self.quant_vocab}"
        rows = [
            ("perplexity", f"{self.perplexity:.4f} ({mode}, target {self.target})"),
            ("reference perplexity", f"{self.reference_perplexity:.4f} (not quantized, target {self.target})"),
            ("top-1 agreement", f"{self.top1_agreement:.4f} (top-1 prediction equal to the reference's)"),
            ("top-1 accuracy", f"{self.top1_accuracy:.4f} (reference {self.reference_top1_accuracy:.4f}; the text's next token)"),
            ("tokens", f"{self.tokens} scored in {self.windows} windows of ctx_len {self.ctx_len}, stride {self.stride}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def read_text(path: str | Path, flag: str = "--text") -> str:
    """The text of ``path`` (UTF-8, given by ``flag``), or one error that says what is wrong with it."""
    data = Path(path).read_bytes()  # a missing or unreadable file: OSError, which the CLI prints as one line
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QGraphError(f"{path} is not UTF-8 text (byte {e.start}); give a UTF-8 text file to {flag}") from None
    if not text.strip():
        raise PerplexityError(f"{path} holds no text; give a text file of at least a few sentences to {flag}")
    return text


def measure_perplexity(
    model: str,
    text_path: str | Path,
    *,
    target: str = "cpu",
    quantize: str | None = None,
    quant_block_size: int | None = None,
    quant_vocab: str | None = None,
    ctx_len: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    target_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> PerplexityReport:
    """Score the text of ``text_path`` on ``model`` compiled for ``target`` (with ``quantize``, and without as the reference)."""
    from qgraph.api import AutoModelForCausalLM
    from qgraph.frontend.hf import load_tokenizer
    from qgraph.pipeline.options import check_token_ids
    from qgraph.runtime import Runtime

    start = time.perf_counter()
    if max_tokens is not None and max_tokens < 2:
        raise PerplexityError(f"--max-tokens {max_tokens} leaves nothing to score; pass --max-tokens 2 or more")
    text = read_text(text_path, "--text")
    lm = AutoModelForCausalLM.from_pretrained(model, progress=progress)
    # batch 1: a window is one row. Every option is checked here, before the (slow) export.
    opts = lm.options(target, ctx_len=ctx_len, batch_size=1, quantize=quantize, quant_block_size=quant_block_size,
                      quant_vocab=quant_vocab, **(target_options or {}))  # fmt: skip
    # verbose=False: a text longer than the model's positions is expected here (it is scored in windows).
    ids = list(load_tokenizer(lm.source)(text, verbose=False)["input_ids"])[:max_tokens]
    ids = check_token_ids([ids], lm.spec.vocab_size)[0]
    stride = max(1, opts.ctx_len // STRIDE_FRACTION) if stride is None else stride
    wins = windows(len(ids), opts.ctx_len, stride)
    runs: dict[str, Scores] = {}
    # The reference: the same options without quantization (nor w8a16's calibration, which only a QDQ graph uses).
    plain = replace(opts, quantize=None, target_options={k: None if k == "calibration" else v for k, v in opts.target_options.items()})
    plan = [("reference", plain)] + ([(f"--quantize {quantize}", opts)] if quantize else [])
    for name, o in plan:
        lm.compile(target, options=o)
        rt = Runtime(lm.artifact_dir)  # type: ignore[arg-type]
        last = [time.perf_counter()]

        def step(done: int, total: int, name: str = name, last: list[float] = last) -> None:
            if progress is not None and (done == total or time.perf_counter() - last[0] > 2.0):
                last[0] = time.perf_counter()
                progress(f"scoring {name}: window {done}/{total}")

        runs[name] = score(rt, ids, wins, step)
    ref = runs["reference"]
    run = runs[plan[-1][0]]
    return PerplexityReport(
        perplexity=run.perplexity,
        tokens=len(run.nll),
        top1_agreement=run.agreement(ref),
        reference_perplexity=ref.perplexity,
        top1_accuracy=run.accuracy,
        reference_top1_accuracy=ref.accuracy,
        model=str(model),
        target=target,
        quantize=quantize,
        quant_block_size=opts.quant_block_size if opts.weight_only else None,
        quant_vocab=opts.quant_vocab if opts.weight_only else None,
        ctx_len=opts.ctx_len,
        stride=stride,
        windows=len(wins),
        text=str(text_path),
        seconds=time.perf_counter() - start,
    )


__all__ = ["PerplexityReport", "measure_perplexity", "read_text"]
