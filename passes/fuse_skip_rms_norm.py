"""Fuse a residual Add and the RMSNormalization that reads it into ONNX Runtime's
``com.microsoft.SkipSimplifiedLayerNormalization`` (the ``cpu`` target's final slot; the matching is
:mod:`passes.skip_norms`, shared with fuse-skip-layer-norm).

    s = Add(a, b)                          y, _, _, s = SkipSimplifiedLayerNormalization(a, b, gamma)
    y = RMSNormalization(s, gamma)   ->    (s kept as output 3 when anything else reads it)
"""

from __future__ import annotations

from passes.skip_norms import SkipNormFusion


class FuseSkipRmsNorm(SkipNormFusion):
    """Add + RMSNormalization(axis=-1) -> ``com.microsoft.SkipSimplifiedLayerNormalization`` (ONNX Runtime CPU).

    The Llama family's residual + RMS norm, as onnxruntime-genai's builder writes it (24 fewer nodes in the Llama
    bench shape's decode graph). On ONNX Runtime's CPU provider it is a small gain under int4 and neutral in fp32:
    tools/ab_decode.py on that shape (12 layers, 2 threads, both orders of 300-400 paired steps each), int4 decode
    -0.173 (graph edited by hand), +0.038 and -0.136 ms/token (compiled) of about 3 ms; fp32 -0.086 (by hand) and
    +0.048 ms/token, within the noise; prefill -0.20 to +0.20 ms. The ``cpu`` target runs it (final slot). A Cast
    to float32 of a float32 sum between them (TorchScript's export) is looked through.
    """

    name = "fuse-skip-rms-norm"
    produces = ("skip_rms_norm_fused",)
    anchors = ("RMSNormalization",)
    stat = "skip_rms_norm"
    norm_op = "RMSNormalization"
    fused_op = "SkipSimplifiedLayerNormalization"
