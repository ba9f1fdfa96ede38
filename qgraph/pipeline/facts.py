"""The facts passes require, produce and report: one name per fact, each with what it means.

A pass declares the facts it ``requires``, ``produces`` and ``invalidates``
(class attributes, as these strings); the manager refuses an order in which a
requirement is not produced earlier, before anything runs. A pass may also
report a fact it established at run time (``PassResult.facts``), which later
stages read instead of looking for op names.

A graph a pipeline starts from brings the facts it shows at its interface
(:func:`observe`): a pipeline run on an already retained or pinned graph may
start with the passes that need that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qgraph.ir.contract import RETAINED_SUFFIX

if TYPE_CHECKING:
    from qgraph.ir.graph import Graph

# -- produced by cleanup, undone by the passes that leave nodes behind ------------------------------------
#: Every node comes after the producers of its inputs.
TOPOSORTED = "toposorted"
#: Every node contributes to a graph output (a rewrite that leaves its old nodes for cleanup undoes it).
NO_DEAD_NODES = "no_dead_nodes"

# -- the target-independent rewrite -----------------------------------------------------------------------
#: Arithmetic on constants is computed and Constant nodes are initializers (fold-constants).
CONSTANTS_FOLDED = "constants_folded"
#: Decomposed LayerNorms are LayerNormalization ops, where fuse-layer-norm proved them.
LAYER_NORM_FUSED = "layer_norm_fused"
#: Decomposed RMS norms are RMSNormalization ops, where fuse-rms-norm proved them.
RMS_NORM_FUSED = "rms_norm_fused"
#: Decomposed GELUs (erf and tanh forms) are Gelu ops, where fuse-gelu proved them.
GELU_FUSED = "gelu_fused"
#: The graph follows the retained-state contract (DESIGN.md): ctx_len caches written at position_ids, returned as ``*_RetainedState``.
KV_RETAINED = "kv_retained"

#: Linear layers, the vocabulary projection and the token embedding read int8/int4 blocks (quantize-weights, --quantize).
WEIGHTS_QUANTIZED = "weights_quantized"

# -- a specialization -------------------------------------------------------------------------------------
#: Every graph input and output has a static shape: batch, sequence and cache lengths are numbers.
STATIC_SHAPES = "static_shapes"
#: Layout ops that static shapes make trivial are gone (a decode step's head split is one Reshape), row-wise regions are 2-D.
SHAPES_SIMPLIFIED = "shapes_simplified"
#: Ops that static shapes make identities or constants are gone (fold-identities: a decode step's last-position selection).
IDENTITIES_FOLDED = "identities_folded"
#: Rotate-half rotary embeddings are ``RotaryEmbedding`` ops, where fuse-rotary proved them.
ROTARY_FUSED = "rotary_fused"
#: Attention is ``com.microsoft.MultiHeadAttention``, where fuse-attention proved it (ONNX Runtime only).
ATTENTION_FUSED = "attention_fused"
#: Attention over the retained cache and its cache writes are ``com.microsoft.GroupQueryAttention``, where proved.
DECODE_ATTENTION_FUSED = "decode_attention_fused"
#: A decode step's q/k rotary embeddings are GroupQueryAttention's own (``do_rotary``), where proved.
ATTENTION_ROTARY_FUSED = "attention_rotary_fused"
#: A residual Add and the LayerNormalization reading it are ``com.microsoft.SkipLayerNormalization``, where proved.
SKIP_LAYER_NORM_FUSED = "skip_layer_norm_fused"
#: Linear layers that read one input are one MatMul by their concatenated weights and a Split (pack-matmuls).
MATMULS_PACKED = "matmuls_packed"
#: A residual Add and the RMSNormalization reading it are ``com.microsoft.SkipSimplifiedLayerNormalization``, where proved.
SKIP_RMS_NORM_FUSED = "skip_rms_norm_fused"
#: Finite float32 constants lie in the fp16 range (clip-fp16; by default the large weights are not read).
FP16_CLIPPED = "fp16_clipped"
#: The ops QNN HTP was measured to reject are rewritten into ones it takes (legalize-qnn).
QNN_LEGAL = "qnn_legal"
#: The head merges at one token that QNN HTP miscomputes (batch size = head count) have their Transpose (legalize-qnn-layout).
QNN_HEAD_MERGES_LEGAL = "qnn_head_merges_legal"

# -- reported at run time (PassResult.facts) --------------------------------------------------------------
#: A prompt chunk of several tokens was rewritten to GroupQueryAttention (fuse-decode-attention): the graph
#: takes the runtime's chunks only (in each row, consecutive positions from the chunk's first token, -1 only
#: after them, and the first position + seq_len <= ctx_len).
PREFILL_CHUNKS_CONSECUTIVE = "prefill_chunks_consecutive"

#: Every fact name above.
FACTS: frozenset[str] = frozenset({
    TOPOSORTED, NO_DEAD_NODES, CONSTANTS_FOLDED, LAYER_NORM_FUSED, RMS_NORM_FUSED, GELU_FUSED, KV_RETAINED, WEIGHTS_QUANTIZED,
    STATIC_SHAPES, SHAPES_SIMPLIFIED, ROTARY_FUSED, ATTENTION_FUSED, DECODE_ATTENTION_FUSED, SKIP_LAYER_NORM_FUSED, FP16_CLIPPED,
    QNN_LEGAL, QNN_HEAD_MERGES_LEGAL, MATMULS_PACKED, SKIP_RMS_NORM_FUSED, ATTENTION_ROTARY_FUSED,
    IDENTITIES_FOLDED,
    PREFILL_CHUNKS_CONSECUTIVE,
})  # fmt: skip


def observe(graph: Graph) -> set[str]:
    """The facts ``graph`` shows at its interface, whatever made it: a pipeline's initial facts.

    Only what the inputs and outputs prove is observed (the retained-state
    outputs, static shapes); a fact about the ops inside is known only from
    the pass that produced it.
    """
    facts = set()
    if any(t.name.endswith(RETAINED_SUFFIX) for t in graph.outputs):
        facts.add(KV_RETAINED)
    ends = [*graph.inputs, *graph.outputs]
    if ends and all(t.shape is not None and all(isinstance(d, int) for d in t.shape) for t in ends):
        facts.add(STATIC_SHAPES)
    return facts
