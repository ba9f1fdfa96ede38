"""Fuse a residual Add and the LayerNormalization that reads it into ONNX Runtime's
``com.microsoft.SkipLayerNormalization`` (after pinning; a pass to name, no target runs it; the matching is
:mod:`passes.skip_norms`, shared with fuse-skip-rms-norm).

    s = Add(a, b)                                    y, _, _, s = SkipLayerNormalization(a, b, gamma, beta)
    y = LayerNormalization(s, gamma, beta, axis=-1)  ->  (s kept as output 3 when anything else reads it)

A pre-norm transformer has one such pair per norm (GPT-2: two per layer, and
the final norm): one kernel instead of two, and the sum is written while the
norm reads it. ONNX Runtime's own fusion of this pattern needs 3-D inputs and
fused 1 of 24 sites in GPT-2's decode graph; after simplify-shapes the
activations are 2-D, which the contrib op also takes.

The ``cpu`` target ran it for one stop and dropped it: in ONNX Runtime 1.32 on
a 2-vCPU Xeon the fused kernel is slower than Add + LayerNormalization (7.6
against 2.9 us a norm at one row, 98 against 32 us at 32 rows; prefill +1.7
ms, decode 0 to +0.09 ms/token; PERFORMANCE.md). It stays for other
runtimes and machines, with its goldens and fuzzing.

Declined, with a reason: operands of different or unknown shapes (the op
takes no broadcasting here), a non-float32 sum, a norm over more than the last
axis, a norm that also writes its mean or inverse deviation, gamma or beta
that are not 1-D of the hidden size, and custom-domain look-alikes.
"""

from __future__ import annotations

from passes.skip_norms import SkipNormFusion


class FuseSkipLayerNorm(SkipNormFusion):
    """Add + LayerNormalization(axis=-1) -> ``com.microsoft.SkipLayerNormalization`` (ONNX Runtime CPU)."""

    name = "fuse-skip-layer-norm"
    produces = ("skip_layer_norm_fused",)
    anchors = ("LayerNormalization",)
    stat = "skip_layer_norm"
    norm_op = "LayerNormalization"
    fused_op = "SkipLayerNormalization"
