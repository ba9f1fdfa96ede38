"""The bench's report: the contenders' figures, the ratios, the project's targets, the table, the plot and the JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qgraph.devtools.bench.timing import GENERATION_PAUSE_S, PAIRS, TTFT_PAUSE_S
from qgraph.errors import QGraphError

#: The project's performance targets (issue 6; onnxruntime-genai: issue 18; quantized: issue 19): (what, ratio key,
#: "at least"/"at most", value, the contender the decode target is relative to: its ms/token over the value is the
#: time per token that meets it). A target whose ratio the run did not measure is left out.
TARGETS: list[tuple[str, str, str, float, str]] = [
    ("decode vs Hugging Face eager", "qgraph decode / huggingface decode", "at least", 2.0, "huggingface-eager"),
    ("decode vs ONNX Runtime on the plain export", "qgraph decode / onnxruntime decode", "at least", 1.0, "onnxruntime-plain-export"),
    ("decode vs the bandwidth bound", "qgraph decode / bandwidth bound", "at least", 0.9, "bound"),
    ("TTFT vs ONNX Runtime on the plain export", "qgraph TTFT / onnxruntime TTFT", "at most", 1.0, ""),
    ("decode vs onnxruntime-genai fp32", "qgraph decode / onnxruntime-genai decode", "at least", 1.0, "onnxruntime-genai"),
    ("TTFT vs onnxruntime-genai fp32", "qgraph TTFT / onnxruntime-genai TTFT", "at most", 1.0, ""),
    ("int4 decode vs qgraph fp32", "qgraph int4 decode / qgraph decode", "at least", 2.5, "qgraph-cpu"),
    (
        "int4 decode vs ONNX Runtime's MatMulNBits int4",
        "qgraph int4 decode / onnxruntime matmulnbits int4 decode",
        "at least",
        1.3,
        "onnxruntime-matmulnbits-int4",
    ),
    (
        "int4 decode vs onnxruntime-genai int4",
        "qgraph int4 decode / onnxruntime-genai int4 decode",
        "at least",
        1.0,
        "onnxruntime-genai-int4",
    ),
    ("int4 TTFT vs qgraph fp32", "qgraph int4 TTFT / qgraph TTFT", "at most", 1.0, ""),
    ("int8 decode vs qgraph fp32", "qgraph int8 decode / qgraph decode", "at least", 1.8, "qgraph-cpu"),
    ("int8 TTFT vs qgraph fp32", "qgraph int8 TTFT / qgraph TTFT", "at most", 1.0, ""),
]


def ratio_pairs(quantize: str | None) -> list[tuple[str, str, str, str]]:
    """The ratios between two contenders: (key, contender, the one it is compared with, "decode" or "ttft"). A decode
    ratio is the first's speed over the second's, a TTFT ratio the first's time over the second's."""
    pairs = [
        ("qgraph decode / huggingface decode", "qgraph-cpu", "huggingface-eager", "decode"),
        ("qgraph decode / onnxruntime decode", "qgraph-cpu", "onnxruntime-plain-export", "decode"),
        ("qgraph TTFT / onnxruntime TTFT", "qgraph-cpu", "onnxruntime-plain-export", "ttft"),
        ("qgraph decode / onnxruntime-genai decode", "qgraph-cpu", "onnxruntime-genai", "decode"),
        ("qgraph TTFT / onnxruntime-genai TTFT", "qgraph-cpu", "onnxruntime-genai", "ttft"),
    ]
    if quantize:
        q, name = quantize, f"qgraph-cpu-{quantize}"
        pairs += [
            (f"qgraph {q} decode / qgraph decode", name, "qgraph-cpu", "decode"),
            (f"qgraph {q} TTFT / qgraph TTFT", name, "qgraph-cpu", "ttft"),
            (f"qgraph {q} decode / onnxruntime matmulnbits {q} decode", name, f"onnxruntime-matmulnbits-{q}", "decode"),
            (f"qgraph {q} decode / onnxruntime-genai {q} decode", name, f"onnxruntime-genai-{q}", "decode"),
            (f"qgraph {q} TTFT / onnxruntime-genai {q} TTFT", name, f"onnxruntime-genai-{q}", "ttft"),
            # The same with the vocabulary in the same mode (run when --quant-vocab differs from --quantize).
            (
                f"qgraph {q} vocab {q} decode / onnxruntime matmulnbits {q} decode",
                f"{name}-vocab-{q}",
                f"onnxruntime-matmulnbits-{q}",
                "decode",
            ),
            (f"qgraph {q} vocab {q} decode / onnxruntime-genai {q} decode", f"{name}-vocab-{q}", f"onnxruntime-genai-{q}", "decode"),
        ]
    return pairs


@dataclass
class Result:
    name: str
    ttft_s: float
    decode_tokens_per_s: float
    ms_per_token: float
    runs: list[dict[str, float]] = field(default_factory=list)


@dataclass
class BenchReport:
    model: str
    prompt_len: int
    new_tokens: int
    threads: int
    weight_bytes: int
    bandwidth_gb_s: float
    bound_ms_per_token: float
    results: list[Result]
    ratios: dict[str, float]
    tokens_agree: bool
    #: ms per token of the decode graph's weight products alone (see the module docstring).
    kernel_ceiling_ms_per_token: float = 0.0
    #: how many products the ceiling runs, and their weight bytes.
    kernel_ceiling_products: int = 0
    kernel_ceiling_bytes: int = 0
    #: median of (one qgraph decode step - one kernel-ceiling run) over alternating pairs: the graph's own cost.
    graph_overhead_ms_per_token: float = 0.0
    #: the ratios computed within each round, then their median over rounds.
    paired_ratios: dict[str, float] = field(default_factory=dict)
    #: each round's bandwidth measurement (bandwidth_gb_s is the best of them).
    round_bandwidths_gb_s: list[float] = field(default_factory=list)
    #: each round's best rate of the bound's product per engine (GB/s): {"onnxruntime": .., "numpy": ..}.
    round_engine_bandwidths_gb_s: list[dict[str, float]] = field(default_factory=list)
    #: the bound measured at the same moment as the decode step: ratios over PAIRS alternations (see paired_in_time).
    in_time: dict[str, float] = field(default_factory=dict)
    #: ``--quantize`` (int4, int8) and its block size, or None: the quantized contenders were not run.
    quantize: str | None = None
    quant_block_size: int | None = None
    #: qgraph's vocabulary mode (projection and embedding) under ``quantize``.
    quant_vocab: str | None = None
    #: bytes a quantized decode step reads (every weight product at ``quantize`` with an fp32 scale per block, the
    #: rest as in fp32) and the bound they give at the best bandwidth.
    quantized_weight_bytes: int = 0
    quantized_bound_ms_per_token: float = 0.0
    #: per quantized contender, how many of its greedy tokens equal Hugging Face's fp32 ones before the first difference.
    quantized_tokens_agree: dict[str, int] = field(default_factory=dict)
    #: contenders that were not run, and why.
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": self.targets()}

    def targets(self) -> list[dict[str, Any]]:
        """Each of :data:`TARGETS` with the table's, the per-round and the in-time figure, and whether each meets it.

        ``met`` is the table's verdict. A decode target also gives ``needs_ms_per_token`` (the time per token that
        meets it) and ``needs_x_bound`` (that time as a multiple of the bound's speed: above 1 means reading the
        weights faster than the bound does; a quantized target's bound is the quantized one).
        """
        ms = {r.name: r.ms_per_token for r in self.results} | {"bound": self.bound_ms_per_token}
        out = []
        for what, key, sense, value, rel in TARGETS:
            if key not in self.ratios:
                continue
            figures = {"table": self.ratios[key], "per_round": self.paired_ratios.get(key), "in_time": self.in_time.get(key)}
            t: dict[str, Any] = {"target": what, "ratio": key, sense.replace(" ", "_"): value, **figures}
            for name, v in figures.items():
                t[f"met_{name}" if name != "table" else "met"] = None if v is None else (v >= value if sense == "at least" else v <= value)
            if rel in ms:
                t["needs_ms_per_token"] = ms[rel] / value
                if rel != "bound":
                    t["needs_x_bound"] = self.bound_for(key) / t["needs_ms_per_token"]
            out.append(t)
        return out

    def bound_for(self, name: str) -> float:
        """The bound (ms/token) of a contender or a ratio key: the quantized bound for the quantized ones."""
        q = self.quantize
        quantized = q is not None and (name.endswith(f"-{q}") or name.startswith(f"qgraph {q} "))
        return self.quantized_bound_ms_per_token if quantized else self.bound_ms_per_token

    def _vocab_row_reads(self) -> str:
        """What the ``-vocab-<mode>`` row reads against the default row's vocabulary mode."""
        if self.quant_vocab == f"{self.quantize}-rescore":
            return "its blocks all of the asked size (a few more bytes), without the rescoring"
        return "fewer bytes"

    def table(self) -> str:
        lines = [
            f"model {self.model}: {self.weight_bytes / 1e6:.1f} MB of weights, prompt {self.prompt_len}, "
            f"{self.new_tokens} new tokens, {self.threads} threads",
            f"memory bandwidth {self.bandwidth_gb_s:.1f} GB/s -> bound {self.bound_ms_per_token:.2f} ms/token "
            f"({1000 / self.bound_ms_per_token:.1f} tokens/s)",
        ]
        if self.quantize:
            lines.append(
                f"{self.quantize} (block {self.quant_block_size}, vocabulary {self.quant_vocab or self.quantize}): every weight product quantized, "
                f"{self.quantized_weight_bytes / 1e6:.1f} MB read per step -> bound {self.quantized_bound_ms_per_token:.2f} ms/token; "
                f"the {self.quantize} rows' 'x bound' is against it"
                + (
                    f" (the -vocab-{self.quantize} row: the vocabulary plainly {self.quantize}, {self._vocab_row_reads()})"
                    if self.quant_vocab not in (None, self.quantize)
                    else ""
                )
            )
        if self.kernel_ceiling_ms_per_token:
            lines.append(
                f"kernel ceiling: the decode graph's {self.kernel_ceiling_products} weight products alone "
                f"({self.kernel_ceiling_bytes / 1e6:.1f} MB) take {self.kernel_ceiling_ms_per_token:.2f} ms/token in ONNX Runtime "
                f"({self.bound_ms_per_token / self.kernel_ceiling_ms_per_token:.2f}x bound); qgraph's decode step costs "
                f"{self.graph_overhead_ms_per_token:+.2f} ms more (median of {PAIRS} alternations)"
            )
        if self.in_time:
            t = self.in_time
            lines.append(
                f"paired in time ({PAIRS} alternations of a decode step, the products alone and the bound's product; "
                f"the product's rate scaled by {t['engine factor']:.3f}, numpy's best over ONNX Runtime's): "
                f"bound {t['bound ms per token']:.2f} ms/token, qgraph decode / bound {t['qgraph decode / bandwidth bound']:.2f}, "
                f"kernel ceiling / bound {t['kernel ceiling / bandwidth bound']:.2f}"
            )
            genai = {k: v for k, v in t.items() if "onnxruntime-genai" in k}
            if genai:
                figures = ", ".join(f"{k} {v:.2f}" for k, v in genai.items())
                lines.append(f"decode against onnxruntime-genai paired in time ({t['genai alternations']:.0f} alternations of whole "
                             f"generations, {GENERATION_PAUSE_S} s apart): {figures}")  # fmt: skip
            if "qgraph TTFT / onnxruntime TTFT" in t:
                lines.append(f"TTFT paired in time ({t['ttft alternations']:.0f} alternations of the two prefills, {TTFT_PAUSE_S} s apart): "
                             f"qgraph / onnxruntime {t['qgraph TTFT / onnxruntime TTFT']:.2f}")  # fmt: skip
        lines += [
            "",
            f"{'contender':<30}{'TTFT ms':>10}{'decode tok/s':>14}{'ms/token':>10}{'x bound':>9}",
        ]
        for r in self.results:
            lines.append(f"{r.name:<30}{r.ttft_s * 1e3:>10.1f}{r.decode_tokens_per_s:>14.1f}{r.ms_per_token:>10.2f}"
                         f"{self.bound_for(r.name) / r.ms_per_token:>9.2f}")  # fmt: skip
        lines.append("")
        lines += [f"{k}: {v:.2f}" + (f" (per round: {self.paired_ratios[k]:.2f})" if k in self.paired_ratios else "")
                  for k, v in self.ratios.items()]  # fmt: skip
        lines.append(
            f"greedy tokens identical across contenders{' (fp32)' if self.quantize else ''}: {'yes' if self.tokens_agree else 'NO'}"
        )
        if self.quantized_tokens_agree:
            agree = ", ".join(f"{n} {k}" for n, k in self.quantized_tokens_agree.items())
            lines.append(f"{self.quantize} greedy tokens equal to fp32's before the first difference (of {self.new_tokens}): {agree}")
        lines += [f"not run: {note}" for note in self.notes]
        lines += ["", "targets (met or missed by the table's figure; per round and in time beside it):"]
        for t in self.targets():
            sense, value = ("at least", t["at_least"]) if "at_least" in t else ("at most", t["at_most"])
            extra = ", ".join(f"{k.replace('_', ' ')} {t[k]:.2f}" for k in ("per_round", "in_time") if t[k] is not None)
            line = f"  {t['target']}, {sense} {value:g}x: {_beside(t['table'], value)}" + (f" ({extra})" if extra else "")
            line += " met" if t["met"] else " missed"
            if not t["met"] and "needs_ms_per_token" in t:
                line += f"; needs {t['needs_ms_per_token']:.2f} ms/token"
                line += f", {t['needs_x_bound']:.2f}x the bound's speed" if "needs_x_bound" in t else ""
            lines.append(line)
        return "\n".join(lines)


def _beside(ratio: float, threshold: float) -> str:
    """``ratio`` to two decimals, or as many more (up to five) as it takes not to print the threshold itself: "1.00
    missed" would read as a contradiction where 0.998 says why."""
    digits = 2
    while digits < 5 and ratio != threshold and f"{ratio:.{digits}f}" == f"{threshold:.{digits}f}":
        digits += 1
    return f"{ratio:.{digits}f}"


def save_plot(report: BenchReport, path: str | Path) -> None:
    """A bar chart of decode tokens/s per contender, with the bound as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QGraphError("--plot needs matplotlib: pip install matplotlib") from None
    names = [r.name for r in report.results]
    values = [r.decode_tokens_per_s for r in report.results]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, values, color=["#999999", "#6699cc", "#cc6633"])
    ax.axhline(1000 / report.bound_ms_per_token, color="black", linestyle="--", label="memory-bandwidth bound")
    if report.kernel_ceiling_ms_per_token:
        ax.axhline(1000 / report.kernel_ceiling_ms_per_token, color="gray", linestyle=":", label="kernel ceiling (products alone)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{report.model}: prompt {report.prompt_len}, {report.new_tokens} tokens, {report.threads} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(report: BenchReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2))
