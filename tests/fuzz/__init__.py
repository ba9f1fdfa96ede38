"""Hypothesis strategies: small random graphs holding each pass's target pattern, perturbed; one module per pass.

Each strategy draws a :class:`~fuzz.builder.Case`: an ONNX model, the pass to
run on it and how to compare the result. The pattern comes in the spellings the
pass accepts (operand orders, Pow or Mul, Div or Reciprocal, Constant nodes or
initializers, float32 or float16, opsets old and new), and, with some
probability, perturbed: another constant (a wrong epsilon sign, 0.5 -> 0.4,
exponent 3), an extra consumer of an intermediate, a swapped Sub, another
tensor where the pattern needs the same one, another axis.

:func:`~fuzz.check.check` runs the pass on a case and returns what it did
(``"rewrite"``, ``"decline"`` or ``"refused"``) or fails.
``tests/test_fuzz_passes.py`` runs a few dozen examples per pass;
``tools/fuzz_passes.py`` runs long campaigns. :mod:`fuzz.builder` holds what
the strategies share.
"""

from __future__ import annotations

from hypothesis import strategies as st

from fuzz.attention import attention_cases
from fuzz.attention_rotary import attention_rotary_cases
from fuzz.builder import Case
from fuzz.check import Outcome, check
from fuzz.cleanup import cleanup_cases
from fuzz.clip_fp16 import clip_fp16_cases
from fuzz.decode_attention import decode_attention_cases
from fuzz.fold_constants import fold_constants_cases
from fuzz.fold_identities import fold_identities_cases
from fuzz.gelu import gelu_cases
from fuzz.layer_norm import layer_norm_cases
from fuzz.legalize_qnn import legalize_qnn_cases
from fuzz.legalize_qnn_layout import legalize_qnn_layout_cases
from fuzz.pack_matmuls import pack_matmuls_cases
from fuzz.pin_static_shapes import pin_static_shapes_cases
from fuzz.quantize_weights import quantize_weights_cases
from fuzz.retain_kv_cache import retain_kv_cache_cases
from fuzz.rms_norm import rms_norm_cases
from fuzz.rotary import rotary_cases
from fuzz.simplify_shapes import simplify_shapes_cases
from fuzz.skip_layer_norm import skip_layer_norm_cases

#: The strategy of each pass, by name.
STRATEGIES: dict[str, st.SearchStrategy[Case]] = {
    "fuse-layer-norm": layer_norm_cases(),
    "fuse-rms-norm": rms_norm_cases(),
    "fuse-gelu": gelu_cases(),
    "fold-constants": fold_constants_cases(),
    "fold-identities": fold_identities_cases(),
    "pin-static-shapes": pin_static_shapes_cases(),
    "clip-fp16": clip_fp16_cases(),
    "retain-kv-cache": retain_kv_cache_cases(),
    "legalize-qnn": legalize_qnn_cases(),
    "legalize-qnn-layout": legalize_qnn_layout_cases(),
    "cleanup": cleanup_cases(),
    "fuse-attention": attention_cases(),
    "simplify-shapes": simplify_shapes_cases(),
    "fuse-skip-layer-norm": skip_layer_norm_cases(),
    "fuse-skip-rms-norm": skip_layer_norm_cases(rms=True),
    "fuse-decode-attention": decode_attention_cases(),
    "fuse-attention-rotary": attention_rotary_cases(),
    "fuse-rotary": rotary_cases(),
    "quantize-weights": quantize_weights_cases(),
    "pack-matmuls": pack_matmuls_cases(),
}

__all__ = ["STRATEGIES", "Case", "Outcome", "check"]
