"""Constants that several passes share, each written once."""

from __future__ import annotations

from onnx import TensorProto

#: The float types a fused norm or activation may compute in.
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})
#: Relative tolerance when comparing a graph's constants with a formula's.
CONST_RTOL = 1e-4
#: The domain and version of ONNX Runtime's contrib ops.
MS_DOMAIN, MS_VERSION = "com.microsoft", 1
#: Added to the scores of slots a query must not see; finite in fp16.
MASK_VALUE = -10000.0
#: Neither a folded node's constant inputs nor its result may be larger than this.
MAX_FOLD_BYTES = 1 << 20
