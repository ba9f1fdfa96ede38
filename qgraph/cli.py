"""The ``qgraph`` command line.

Each subcommand is a small function over the Python API. Errors a user can
cause (:class:`qgraph.errors.QGraphError`) print as one line on stderr and exit
non-zero; ``--debug`` shows the traceback instead.

Stdout carries a command's result and nothing else: while the command works,
file descriptor 1 points at stderr, so whatever a library writes there (Python
prints, or native code such as onnxruntime-qnn's "# LIBNATIVE: ..." banner)
lands on stderr; the result goes to the real stdout (``args.out``), so that
``--json`` prints exactly one JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from qgraph.errors import QGraphError
from qgraph.frontend.export import DEFAULT_DTYPE, DTYPES
from qgraph.frontend.hf import BUNDLED_MODELS
from qgraph.pipeline.options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CTX_LEN,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PREFILL_SEQ_LEN,
    DEFAULT_QUANT_BLOCK_SIZE,
    MAX_QUANT_BLOCK_SIZE,
    MIN_QUANT_BLOCK_SIZE,
    QUANT_VOCAB_MODES,
    QUANTIZE_MODES,
    WEIGHT_ONLY_MODES,
    check_at_least_one,
    check_prompts,
    check_token_ids,
)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (what was wrong, and where the help is)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _progress(msg: str) -> None:
    print(f"[qgraph] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _results_only_on_stdout() -> Iterator[TextIO]:
    """Point fd 1 at stderr while a command works; yield the stream for its result, on the real stdout.

    Native libraries write to fd 1 below Python (onnxruntime-qnn prints "# LIBNATIVE: ..." when it
    loads), so only moving the descriptor keeps them out of a ``--json`` document. Where sys.stdout
    is not fd 1 (an embedding, or a test that captures it) the result goes to sys.stdout as it is.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 at all: nothing can write there
        yield sys.stdout
        return
    try:
        is_fd1 = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        is_fd1 = False
    out = open(saved, "w", encoding=getattr(sys.stdout, "encoding", None), closefd=False) if is_fd1 else sys.stdout
    os.dup2(2, 1)
    try:
        yield out
    finally:
        out.flush()
        if out is not sys.stdout:
            out.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_export(args: argparse.Namespace) -> int:
    from qgraph.frontend.export import export_model
    from qgraph.ir.inspect import human_bytes

    res = export_model(args.model, args.output, exporter=args.exporter, opset=args.opset, dtype=args.dtype, progress=_progress)
    size = human_bytes(res.size_bytes)
    print(f"wrote {res.path} ({size}, {res.dtype}, {res.exporter} exporter, opset {res.opset}, {res.seconds:.1f} s)", file=args.out)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from qgraph.ir.graph import Graph
    from qgraph.ir.inspect import format_summary, summarize

    summary = summarize(Graph.load(args.file))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary), file=args.out)
    return 0


def _pass_list(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def cmd_optimize(args: argparse.Namespace) -> int:
    from qgraph.ir.graph import Graph
    from qgraph.ir.inspect import human_bytes
    from qgraph.pipeline.optimize import optimize
    from qgraph.pipeline.options import check_pin

    check_pin(args.batch_size, args.seq_len)
    graph = Graph.load(args.input)
    _progress(f"loaded {args.input} ({graph.node_count()} nodes, weights {human_bytes(graph.weights_nbytes())})")
    report = optimize(graph, _pass_list(args.passes), ctx_len=args.ctx_len, batch_size=args.batch_size, seq_len=args.seq_len,
                      check=args.check, quantize=args.quantize, quant_block_size=args.quant_block_size, quant_vocab=args.quant_vocab)  # fmt: skip
    out = graph.save(args.output)
    print(report.to_json() if args.json else report.table(), file=args.out)
    print(f"wrote {out} ({graph.node_count()} nodes)", file=sys.stderr if args.json else args.out)
    return 0


def _calibration_prompts(path: Path | None) -> list[str] | None:
    """The prompts of a --calibration file, one per non-blank line."""
    if path is None:
        return None
    from qgraph.devtools.perplexity import read_text

    return [line for line in read_text(path, "--calibration").splitlines() if line.strip()]


#: Each target's own flags (their argparse names and spellings): another target's are refused, not ignored.
_TARGET_FLAGS = {
    "cpu": {"threads": "--threads"},
    "qnn": {"soc_model": "--soc-model", "fp16": "--fp16", "allow_cpu_fallback": "--allow-cpu-fallback", "calibration": "--calibration"},
    "qaic": {"aic_hw_version": "--aic-hw-version", "num_cores": "--num-cores", "mxfp6_matmul": "--mxfp6-matmul", "kv_dtype": "--kv-dtype"},
}


def _target_options(args: argparse.Namespace) -> dict[str, object]:
    for target, flags in _TARGET_FLAGS.items():
        given = [flag for key, flag in flags.items() if target != args.target and getattr(args, key, None) not in (None, False)]
        if given:
            raise QGraphError(f"{' and '.join(given)} {'are' if len(given) > 1 else 'is'} for --target {target}, "
                              f"not --target {args.target}; drop {'them' if len(given) > 1 else 'it'}")  # fmt: skip
    opts: dict[str, object] = {}
    if args.target == "qnn":
        opts = {"soc_model": args.soc_model, "fp16": args.fp16 or None, "allow_cpu_fallback": args.allow_cpu_fallback or None,
                "calibration": _calibration_prompts(args.calibration)}  # fmt: skip
    elif args.target == "qaic":
        opts = {"aic_hw_version": args.aic_hw_version, "num_cores": args.num_cores, "mxfp6_matmul": args.mxfp6_matmul or None,
                "kv_dtype": args.kv_dtype}  # fmt: skip
    elif args.target == "cpu":
        opts = {"threads": args.threads}
    return {k: v for k, v in opts.items() if v is not None}


def cmd_compile(args: argparse.Namespace) -> int:
    from qgraph.compile import compile_model

    out = compile_model(args.input, args.target, args.output, prefill_seq_len=args.prefill_seq_len, ctx_len=args.ctx_len,
                        batch_size=args.batch_size, options=_target_options(args), dry_run=args.dry_run, progress=_progress,
                        quantize=args.quantize, quant_block_size=args.quant_block_size, quant_vocab=args.quant_vocab)  # fmt: skip
    if args.target == "qaic":
        print((out / "qaic_compile.sh").read_text().split("\n", 2)[-1].strip(), file=args.out)
    print(f"wrote {out}", file=args.out)
    return 0


@contextlib.contextmanager
def _held_warnings(hold: bool) -> Iterator[list[logging.LogRecord]]:
    """With ``hold``, qgraph's warnings meanwhile are kept in the list yielded instead of printed (a streamed line is
    being written); the caller prints them after it."""
    held: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and record.name.split(".")[0] == "qgraph":
            if not any(r is record for r in held):  # each handler asks
                held.append(record)
            return False
        return True

    handlers = logging.getLogger().handlers if hold else []  # a logger's filter does not see its children's records
    for h in handlers:
        h.addFilter(keep)
    try:
        yield held
    finally:
        for h in handlers:
            h.removeFilter(keep)


def cmd_generate(args: argparse.Namespace) -> int:
    from qgraph.api import AutoModelForCausalLM
    from qgraph.runtime import Sampling

    if args.prompt and args.input_ids:
        raise QGraphError("give either text prompts or --input-ids, not both")
    if not args.prompt and not args.input_ids:
        raise QGraphError('give a prompt (qgraph generate "Hi there!!") or --input-ids 1,2,3')
    if args.chat and args.input_ids:
        raise QGraphError("--chat puts text prompts through the chat template; give a text prompt, not --input-ids")
    # Bad arguments fail before the (slow) export and compile: these first, the options once the model's config is read.
    check_at_least_one("max_new_tokens", args.max_new_tokens)
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    Sampling(**sampling).check()
    if args.temperature == 0 and (args.top_k or args.top_p < 1 or args.seed is not None):
        _progress("warning: --top-k, --top-p and --seed shape sampling, which --temperature above 0 turns on; this run is greedy")
    input_ids = None
    if args.input_ids:
        try:
            input_ids = [[int(x) for x in row.split(",") if x.strip()] for row in args.input_ids]
        except ValueError:
            raise QGraphError("--input-ids takes comma-separated integers, e.g. --input-ids 15496,612") from None
    check_prompts(input_ids or args.prompt, None)  # names an empty prompt
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, progress=_progress)
    # A missing or unsupported model fails here too (its config is read), before any work.
    opts = model.options(args.target, prefill_seq_len=args.prefill_seq_len, ctx_len=args.ctx_len, batch_size=args.batch_size,
                         quantize=args.quantize, quant_block_size=args.quant_block_size, quant_vocab=args.quant_vocab, **_target_options(args))  # fmt: skip
    tokenizer = None
    ids = input_ids or []
    if args.prompt:
        from qgraph.frontend.hf import encode_prompts, load_tokenizer

        tokenizer = load_tokenizer(model.source)
        ids = encode_prompts(tokenizer, args.prompt, chat=args.chat)
    check_prompts(ids, opts.ctx_len)
    check_token_ids(ids, model.spec.vocab_size)
    model.compile(args.target, artifacts=args.artifacts, options=opts)
    streamer = None
    n_rows = len(args.prompt or input_ids or [])
    stdout = args.out
    if tokenizer is not None and n_rows == 1 and not args.json:
        from qgraph.frontend.hf import TextStream

        def write(text: str) -> None:
            stdout.write(text)
            stdout.flush()

        write(args.prompt[0] + ("\n" if args.chat else ""))  # a chat reply starts on a line of its own
        streamer = TextStream(tokenizer, ids[0], write, strip=args.chat)

    with _held_warnings(streamer is not None) as held:  # a warning would land inside the streamed line
        out = model.generate(args.prompt or None, tokenizer, input_ids=input_ids, max_new_tokens=args.max_new_tokens,
                             streamer=streamer, chat=args.chat, **sampling)  # fmt: skip
    if args.json:
        print(json.dumps({"tokens": out.tokens, "text": out.text, "stats": out.stats.to_dict(), "target": args.target,
                          "artifacts": str(model.artifact_dir), "finish_reasons": out.finish_reasons}), file=stdout)  # fmt: skip
        return 0
    if streamer is not None:
        streamer.finish()  # what was held back: a character split over the last tokens
        print(file=stdout, flush=True)
        for record in held:
            _progress(f"warning: {record.getMessage()}")
    else:
        for i, row in enumerate(out.text or out.tokens):
            prefix = args.prompt[i] if args.prompt else ""
            print(f"[{i}] {prefix}{row}", file=stdout)
    print(file=stdout)
    print(out.stats.table(), file=stdout)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from qgraph.devtools.bench import run_bench, save_plot, write_json

    report = run_bench(args.model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, rounds=args.rounds, threads=args.threads,
                       workdir=args.workdir, progress=_progress, quantize=args.quantize, quant_block_size=args.quant_block_size, quant_vocab=args.quant_vocab)  # fmt: skip
    write_json(report, args.output)
    if args.plot:
        save_plot(report, args.plot)
    print(json.dumps(report.to_dict()) if args.json else report.table(), file=args.out)
    _progress(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from qgraph.devtools.perplexity import measure_perplexity

    report = measure_perplexity(args.model, args.text, target=args.target, quantize=args.quantize, quant_block_size=args.quant_block_size, quant_vocab=args.quant_vocab,
                                ctx_len=args.ctx_len, stride=args.stride, max_tokens=args.max_tokens,
                                target_options=_target_options(args), progress=_progress)  # fmt: skip
    print(json.dumps(report.to_dict()) if args.json else report.table(), file=args.out)
    return 0


def _add_target_options(p: argparse.ArgumentParser, targets: Sequence[str]) -> None:
    """The options of ``targets`` only: a command lists (and takes) no option of a target it cannot build."""
    g = p.add_argument_group("target options")
    if "cpu" in targets:
        g.add_argument("--threads", type=int, default=None, help="cpu: intra-op threads (default: ONNX Runtime's)")
    if "qnn" in targets:
        g.add_argument("--soc-model", type=int, default=None, help="qnn: HTP SoC model (default works on x86: 60)")
        g.add_argument("--fp16", action="store_true", help="qnn: run in fp16")
        g.add_argument("--allow-cpu-fallback", action="store_true", help="qnn: let nodes QNN rejects run on the CPU")
        g.add_argument("--calibration", type=Path, default=None, metavar="FILE",
                       help="qnn --quantize w8a16: calibration prompts, one per line (default: a built-in set)")  # fmt: skip
    if "qaic" in targets:
        g.add_argument("--aic-hw-version", default=None, help="qaic: -aic-hw-version (default 2.0)")
        g.add_argument("--num-cores", type=int, default=None, help="qaic: -aic-num-cores (default 16)")
        g.add_argument("--mxfp6-matmul", action="store_true", help="qaic: -mxfp6-matmul")
        g.add_argument("--kv-dtype", choices=("float16", "float32"), default=None, help="qaic: KV cache precision on the device")


CTX_HELP = f"tokens the KV cache holds (default {DEFAULT_CTX_LEN}, or the model's maximum if smaller)"
MODEL_HELP = f"hub id, local Hugging Face folder, or a bundled model: {', '.join(BUNDLED_MODELS)} (default {BUNDLED_MODELS[0]})"
PREFILL_HELP = f"tokens of a prompt chunk, the prefill specialization's width (default {DEFAULT_PREFILL_SEQ_LEN})"
BATCH_HELP = f"rows run together (default {DEFAULT_BATCH_SIZE})"
DTYPE_HELP = f"the model's weights, caches and logits (default {DEFAULT_DTYPE})"


def _add_quantize_options(p: argparse.ArgumentParser, modes: Sequence[str] = QUANTIZE_MODES) -> None:
    p.add_argument("--quantize", choices=modes, default=None,
                   help="weight-only quantization: int8 or int4 (cpu: MatMulNBits, symmetric blocks), w8a16 (qnn: QDQ)")  # fmt: skip
    p.add_argument("--quant-block-size", type=int, default=None,
                   help=f"weights per quantization block (default {DEFAULT_QUANT_BLOCK_SIZE}; a power of two from {MIN_QUANT_BLOCK_SIZE} to {MAX_QUANT_BLOCK_SIZE})")  # fmt: skip
    p.add_argument("--quant-vocab", choices=QUANT_VOCAB_MODES, default=None,
                   help="int8/int4: the vocabulary's mode, its projection and the token embedding (default: int8 under int8, "
                        "int4-rescore under int4: int4 blocks (coarser, 128 where the width allows: they only pick) whose top "
                        "candidates per token are rescored from int8 ones of the block size, as "
                        "accurate as int8 there at int4's bytes per step; plain int4 costs most of int4's accuracy)")  # fmt: skip


def _add_global_options(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logging")
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log one line per pass")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qgraph", description="A graph-rewriting compiler for ONNX causal LMs.")
    _add_global_options(parser, False)
    # --debug and -v after the subcommand too; SUPPRESS: a subcommand that is not given them keeps the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("export", parents=[common], help="export a Hugging Face GPT-2 to plain ONNX (no rewriting)")
    p.add_argument("model", nargs="?", default="tiny-gpt2", help=MODEL_HELP)
    p.add_argument("-o", "--output", type=Path, default=Path("model.onnx"), help="output ONNX file (default model.onnx)")
    p.add_argument(
        "--exporter",
        choices=("dynamo", "torchscript"),
        default=None,
        help="default: dynamo, or torchscript for a model torch.export cannot trace (dynamic NTK rope scaling)",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("optimize", parents=[common], help="rewrite an ONNX graph with the pass pipeline")
    p.add_argument("input", type=Path, help="ONNX file (a raw export, or any GPT-2-like graph)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output ONNX file")
    p.add_argument("--ctx-len", type=int, default=None, help=CTX_HELP)
    p.add_argument("--batch-size", type=int, default=None, help="pin the batch size (with --seq-len)")
    p.add_argument("--seq-len", type=int, default=None, help="pin the sequence length (with --batch-size)")
    p.add_argument("--passes", default=None, help="comma-separated pass names (default: the default pipeline)")
    p.add_argument("--check", action="store_true", help="verify the graph after every pass")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_quantize_options(p)
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("compile", parents=[common], help="compile an optimized graph (or a raw export) for a device")
    p.add_argument("input", type=Path, help="ONNX file: a raw export or an optimized (retained-state) graph")
    p.add_argument("--target", choices=("cpu", "qnn", "qaic"), required=True)
    p.add_argument("-o", "--output", type=Path, required=True, help="artifact directory")
    p.add_argument("--prefill-seq-len", type=int, default=None, help=PREFILL_HELP)
    p.add_argument("--ctx-len", type=int, default=None, help=CTX_HELP)
    p.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)
    p.add_argument("--dry-run", action="store_true", help="qaic only: write the compiler's inputs and print its command")
    _add_quantize_options(p)
    _add_target_options(p, ("cpu", "qnn", "qaic"))
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("generate", parents=[common], help="export, optimize, compile and run a model; print text and latency")
    p.add_argument("prompt", nargs="*", help="text prompts")
    p.add_argument("--model", default="tiny-gpt2", help=MODEL_HELP)
    p.add_argument("--chat", action="store_true", help="put each prompt through the tokenizer's chat template as a user message")
    p.add_argument("--input-ids", action="append", default=None, help="a prompt as token ids, e.g. 1,2,3 (repeatable)")
    p.add_argument("--target", choices=("cpu", "qnn"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE, help=DTYPE_HELP)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="tokens to add to each prompt (default %(default)s)")
    p.add_argument("--ctx-len", type=int, default=None, help=CTX_HELP)
    p.add_argument("--prefill-seq-len", type=int, default=None, help=PREFILL_HELP)
    p.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)
    p.add_argument("--artifacts", type=Path, default=None, help="keep the artifact directory here (default: the cache)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_quantize_options(p)
    _add_target_options(p, ("cpu", "qnn"))
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "bench",
        parents=[common],
        help="decode speed: Hugging Face, plain ONNX Runtime, onnxruntime-genai, qgraph cpu, the kernel ceiling and the memory bound",
    )
    p.add_argument(
        "--model",
        default="random:gpt2",
        help="hub id, folder, tiny-gpt2, tiny-llama, or random:gpt2|gpt2-medium|gpt2-large|gpt2-xl|llama (default random:gpt2)",
    )
    _add_quantize_options(p, WEIGHT_ONLY_MODES)  # adds the quantized contenders to the fp32 ones
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None, help="keep the export and artifact here (reused if present)")
    p.add_argument("--output", type=Path, default=Path("bench.json"), help="JSON results file (default bench.json)")
    p.add_argument("--json", action="store_true", help="print the JSON object instead of the table")
    p.add_argument("--plot", type=Path, default=None, help="save a bar chart (needs matplotlib)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "perplexity",
        parents=[common],
        help="perplexity of a text, and top-1 agreement of a quantized model with the unquantized one",
        description="Teacher-forced perplexity of the text of --text FILE on the model compiled for --target, and with --quantize "
        "how often its top-1 prediction is that of the same model and target without quantization (compiled and scored too). "
        "A text longer than ctx_len is scored in windows of ctx_len tokens that start every --stride tokens, each from an "
        "empty cache; a window scores only the tokens the previous one did not (Hugging Face's sliding-window recipe), so "
        "every token but the first is scored once, with at least ctx_len - stride tokens of context after the first window.",
    )
    p.add_argument("--model", default="tiny-gpt2", help="hub id, local Hugging Face folder, or tiny-gpt2 (default)")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file, tokenized whole with the model's tokenizer")
    p.add_argument("--target", choices=("cpu", "qnn"), default="cpu")
    p.add_argument("--ctx-len", type=int, default=None, help="window length: " + CTX_HELP)
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default ctx_len / 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens (the HTP simulator is slow)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_quantize_options(p)
    _add_target_options(p, ("cpu", "qnn"))
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("inspect", parents=[common], help="show an ONNX file's inputs, outputs, opsets, ops and weight size")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # huggingface_hub logs through a handler of its own; propagating too printed each of its warnings twice.
    logging.getLogger("huggingface_hub").propagate = False
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _results_only_on_stdout() as out:
            args.out = out
            return int(args.func(args) or 0)
    except QGraphError as e:
        if args.debug:
            raise
        print(f"qgraph {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a path the user gave cannot be read or written
        if args.debug:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"qgraph {args.command}: error: {e.strerror or _one_line(e)}{where}; check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qgraph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
