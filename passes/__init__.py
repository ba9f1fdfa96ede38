"""The rewrite passes, one per module; this list is the registry (no magic).

The other modules are what passes share, none of them a pass: ``constants``;
``const_values``, ``dtypes`` and ``shapes`` (reading a graph's constants, element
types and shapes); ``matching`` and ``pattern`` (the fusions' graph walks and
their declarative matcher); ``norms`` (what both norm fusions match); ``opset``
(raising the opset for a fused op newer than the graph); ``folding`` and
``fold_kernels`` (constant folding, for fold-constants and pin-static-shapes);
``skip_norms`` (a residual Add and its norm as one contrib op, for both skip-norm fusions);
``positions`` (what the attention fusions prove about positions and slots); ``kv_caches`` (an export's growing KV caches and the attention each feeds, for
retain-kv-cache); ``rope_tables`` (a rotary embedding's cos/sin tables, evaluated
from the graph, for fuse-rotary).
"""

from __future__ import annotations

from passes.cleanup import Cleanup
from passes.clip_fp16 import ClipFp16
from passes.fold_constants import FoldConstants
from passes.fold_identities import FoldIdentities
from passes.fuse_attention import FuseAttention
from passes.fuse_attention_rotary import FuseAttentionRotary
from passes.fuse_decode_attention import FuseDecodeAttention
from passes.fuse_gelu import FuseGelu
from passes.fuse_layer_norm import FuseLayerNorm
from passes.fuse_rms_norm import FuseRmsNorm
from passes.fuse_rotary import FuseRotary
from passes.fuse_skip_layer_norm import FuseSkipLayerNorm
from passes.fuse_skip_rms_norm import FuseSkipRmsNorm
from passes.legalize_qnn import LegalizeQnn
from passes.legalize_qnn_layout import LegalizeQnnLayout
from passes.pack_matmuls import PackMatmuls
from passes.pin_static_shapes import PinStaticShapes
from passes.quantize_weights import QuantizeWeights
from passes.retain_kv_cache import RetainKvCache
from passes.simplify_shapes import SimplifyShapes
from qgraph.pipeline.manager import Pass

#: Every built-in pass, by command-line name.
ALL_PASSES: dict[str, type[Pass]] = {
    p.name: p
    for p in (
        Cleanup,
        FoldConstants,
        FuseLayerNorm,
        FuseRmsNorm,
        FuseGelu,
        PinStaticShapes,
        ClipFp16,
        RetainKvCache,
        LegalizeQnn,
        LegalizeQnnLayout,
        FuseAttention,
        SimplifyShapes,
        FoldIdentities,
        FuseSkipLayerNorm,
        FuseSkipRmsNorm,
        FuseDecodeAttention,
        FuseAttentionRotary,
        FuseRotary,
        PackMatmuls,
        QuantizeWeights,
    )
}

__all__ = [
    "ALL_PASSES",
    "Cleanup",
    "ClipFp16",
    "FoldConstants",
    "FoldIdentities",
    "FuseAttention",
    "FuseAttentionRotary",
    "FuseDecodeAttention",
    "FuseGelu",
    "FuseLayerNorm",
    "FuseRmsNorm",
    "FuseRotary",
    "FuseSkipLayerNorm",
    "FuseSkipRmsNorm",
    "LegalizeQnn",
    "LegalizeQnnLayout",
    "PackMatmuls",
    "PinStaticShapes",
    "QuantizeWeights",
    "RetainKvCache",
    "SimplifyShapes",
]
