"""The whole pipeline, declared in one place.

A raw export goes through :data:`REWRITE` once (``qgraph optimize``, and a
compile's first step). A compile then gives each specialization (prefill:
prefill_seq_len tokens; decode: one) its own copy, which goes through
:data:`SPECIALIZE`; a target fills its slots there (:data:`LEGALIZE`,
:data:`FINAL`) with its own passes, declared as ``Target.slots``; the options
fill :data:`QUANTIZE` (``--quantize int8|int4``). Each entry says why it is
where it is.

The pass manager checks an order from what each pass requires and produces
(:mod:`qgraph.pipeline.facts`) before anything runs; nothing reorders passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from qgraph.errors import PassOrderError


@dataclass(frozen=True)
class Slot:
    """A place in the pipeline that a target fills with its own passes (``Target.slots[name]``)."""

    name: str


#: A stage: pass names (``--passes`` names) and slots, in order.
Stage = tuple[str | Slot, ...]

#: The target's lowering onto what its compiler takes, on the pinned graph (cpu: fuse-attention; qnn: legalize-qnn).
LEGALIZE = Slot("legalize")
#: The target's rewrites of the simplified graph (cpu: fuse-decode-attention).
FINAL = Slot("final")
SLOTS = (LEGALIZE, FINAL)
#: Weight-only quantization (quantize-weights), filled by the options (``--quantize int8|int4``), not by a target.
QUANTIZE = Slot("quantize")
#: What fills :data:`QUANTIZE`: pack-matmuls first, which pays only when the weights are quantized (a Llama shape on
#: 2 threads, both orders of 300 paired steps, tools/ab_decode.py: int4 decode -0.32 ms/token (of 3.0), prefill
#: -0.26 ms; fp32 decode -0.05 ms/token, within the noise, prefill +0.29 ms); quantize-weights then quantizes the
#: packed weights.
QUANTIZE_PASSES = ("pack-matmuls", "quantize-weights")

#: A raw export -> the retained-state contract, shapes still symbolic.
REWRITE: Stage = (
    "fold-constants",  # exporters leave Constant nodes and arithmetic on constants behind
    "fuse-layer-norm",  # TorchScript below opset 17 decomposes LayerNorm into 9 ops
    "fuse-rms-norm",  # Llama-family RMSNorm (Gemma's 1 + weight folded already), computed in fp32: the fp16 norm fix
    "fuse-gelu",  # both exporters decompose GPT-2's gelu_new (Pow, Tanh, ...)
    "cleanup",  # drop what the fusions left before the cache and its attention are matched
    "retain-kv-cache",  # growing cache -> a fixed ctx_len cache kept between steps
    "cleanup",  # the optimized graph leaves sorted and free of dead nodes, whatever the export held
)
#: Pin one graph's shapes (``qgraph optimize --batch-size --seq-len``; a compile's first stage per specialization).
PIN: Stage = (
    "pin-static-shapes",  # accelerators need static shapes: batch_size, seq_len and ctx_len become numbers
    "cleanup",  # the target's passes start from a sorted graph free of dead nodes
)
#: One specialization's graph, pinned and built for a target.
SPECIALIZE: Stage = (
    *PIN,  # prefill: [batch_size, prefill_seq_len]; decode: [batch_size, 1]
    LEGALIZE,  # on the exporters' layouts: after simplify-shapes, cpu's fuse-attention leaves no decode attention to fuse (measured)
    "simplify-shapes",  # static shapes make layout ops trivial; row-wise regions go 2-D
    FINAL,  # after simplify-shapes: its matches need the simplified layouts, and 2-D regions do not grow through fused ops
    # After the final slot, whose fusions match retain-kv-cache's nodes as that pass wrote them (and add the Reshapes
    # it merges); before quantize-weights, which then finds the vocabulary projection reading the hidden state itself.
    "fold-identities",  # a decode step's last-position selection and padding redirect are identities at one token
    # Last: the passes before it see Gemm and Gather, whose static shapes ONNX inference gives (it stops at a contrib op
    # such as MatMulNBits, and pin-static-shapes re-infers every shape); after retain-kv-cache, whose last-position
    # logits select one row in front of the vocabulary MatMul; before finish, so the vocabulary is fed only in fp32.
    QUANTIZE,
    "cleanup",  # drop what the target's passes left (and the fp32 weights a quantization replaced)
)
#: ``qgraph optimize --quantize``: quantized at the end, as a compile does.
OPTIMIZE_QUANTIZED: Stage = (QUANTIZE, "cleanup")


class FillsSlots(Protocol):
    """A target, as far as the pipeline is concerned: a name and the passes of its slots (``Target.slots``)."""

    @property
    def name(self) -> str: ...

    @property
    def slots(self) -> Mapping[str, Sequence[str]]: ...


def expand(stage: Stage, target: FillsSlots | None = None, *, quantize: bool = False) -> list[str]:
    """``stage``'s pass names, each slot replaced by ``target``'s passes for it (none without a target),
    the quantize slot by :data:`QUANTIZE_PASSES` when ``quantize``."""
    if target is not None:
        unknown = sorted(set(target.slots) - {s.name for s in SLOTS})
        if unknown:
            raise PassOrderError(
                f"target {target.name} fills unknown slot(s) {unknown}; the pipeline has {[s.name for s in SLOTS]} (qgraph.pipeline.stages)"
            )
    out: list[str] = []
    for entry in stage:
        if entry == QUANTIZE:
            out += list(QUANTIZE_PASSES) if quantize else []
        elif isinstance(entry, Slot):
            out += list(target.slots.get(entry.name, ())) if target is not None else []
        else:
            out.append(entry)
    return out


def default_pipeline(pinned: bool, quantize: bool = False) -> list[str]:
    """``qgraph optimize``'s passes: the rewrite, pinning when a batch size and seq_len are given, quantization when asked."""
    return expand(REWRITE + (PIN if pinned else ()) + (OPTIMIZE_QUANTIZED if quantize else ()), quantize=quantize)


def compile_pipeline(target: FillsSlots, *, rewrite: bool, quantize: bool = False) -> tuple[list[str], list[str]]:
    """A compile's passes for ``target``: (the rewrite, run once, or none for an already retained graph;
    the specialization's, run on each specialization, quantizing when asked)."""
    return (expand(REWRITE) if rewrite else []), expand(SPECIALIZE, target, quantize=quantize)
