"""The quantized anchor: ONNX Runtime's own weight-only path (``MatMulNBitsQuantizer``) on the plain export.

The quantizer only takes a ``MatMul`` whose weight is an initializer. The exporters leave GPT-2's linear layers as
``Gemm`` and dynamo leaves a tied vocabulary projection as ``MatMul(x, Transpose(embedding))``, which it would skip
(the 154 MB projection of gpt2-small left in fp32), so before quantizing, to put the anchor at its best:

* ``Gemm(A, B, C)`` with a constant ``B`` (alpha = beta = 1, no transA) becomes ``MatMul(A, B')`` + ``Add(C)``, where
  ``B'`` is ``B`` transposed when transB is set;
* ``MatMul(x, Transpose(W))`` with a constant 2-D ``W`` reads ``W`` transposed as its own initializer.

Then every such MatMul is quantized: symmetric, round to nearest, the bench's block size, accuracy level 4 (int8
activations; the int8 kernel's only fast path on CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: MatMulNBits' accuracy level: int8 activations (level 0 takes a slow int8 path on CPU, 0.08x).
ACCURACY_LEVEL = 4
#: Bits per weight of each precision the bench quantizes to.
BITS = {"int4": 4, "int8": 8}


def attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else default


def constant_weight_matmuls(model: Any) -> dict[str, int]:
    """Turn the linear layers the quantizer would skip into ``MatMul`` with an initializer weight (see the module
    docstring), in place; returns what was converted: ``{"gemm": n, "transposed_weight": m}``."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    stats = {"gemm": 0, "transposed_weight": 0}
    nodes = []
    for n in g.node:
        if n.op_type == "Gemm" and n.domain in ("", "ai.onnx") and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            if attr(n, "alpha", 1.0) == 1.0 and attr(n, "beta", 1.0) == 1.0 and not attr(n, "transA", 0):
                w = array(n.input[1])
                name = n.input[1] + ("/t" if attr(n, "transB", 0) else "")
                if name not in inits:
                    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
                    inits[name] = g.initializer[-1]
                has_bias = len(n.input) > 2 and n.input[2] != ""
                product = n.output[0] + "/matmul" if has_bias else n.output[0]
                nodes.append(helper.make_node("MatMul", [n.input[0], name], [product], name=f"{n.name}/matmul"))
                if has_bias:
                    nodes.append(helper.make_node("Add", [product, n.input[2]], [n.output[0]], name=f"{n.name}/bias"))
                stats["gemm"] += 1
                continue
        if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and n.input[1] in producers:
            t = producers[n.input[1]]
            if t.op_type == "Transpose" and t.input[0] in inits and len(inits[t.input[0]].dims) == 2 and attr(t, "perm", [1, 0]) == [1, 0]:
                name = t.input[0] + "/t"
                if name not in inits:
                    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array(t.input[0]).T), name))
                    inits[name] = g.initializer[-1]
                n.input[1] = name  # the Transpose, now unread, is dropped by the quantizer's clean-up
                stats["transposed_weight"] += 1
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return stats


def quantize_plain_export(raw: str | Path, out: str | Path, precision: str, block_size: int = 32) -> dict[str, int]:
    """Write ``raw`` (the plain export) with every linear layer as ONNX Runtime's ``MatMulNBits`` at ``precision``
    (int4 or int8) to ``out``, weights in ``out``.data; returns the conversion's counts and ``matmulnbits``."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(raw))
    stats = constant_weight_matmuls(model)
    q = MatMulNBitsQuantizer(model, bits=BITS[precision], block_size=block_size, is_symmetric=True, accuracy_level=ACCURACY_LEVEL)
    q.process()
    q.model.remove_unused_constant()
    quantized = q.model.model
    stats["matmulnbits"] = sum(n.op_type == "MatMulNBits" for n in quantized.graph.node)
    out = Path(out)
    onnx.save(quantized, str(out), save_as_external_data=True, location=out.name + ".data", size_threshold=1024)
    return stats
