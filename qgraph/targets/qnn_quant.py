"""``--target qnn --quantize w8a16``: a QDQ graph with 8-bit weights and 16-bit activations for the HTP.

ONNX Runtime's QNN quantization tools do the work (``onnxruntime.quantization``): ``qnn_preprocess_model``
(fusions the HTP wants), ``get_qnn_qdq_config`` (the overrides QNN needs: types per op, LayerNorm and MatMul
weights in the weight type) and ``quantize``, static MinMax calibration. What qgraph adds is the calibration
data: each specialization is calibrated on the steps it will run. The float graph of that specialization
runs on ONNX Runtime's CPU provider over the calibration token rows (chunks as wide as its ``input_ids``,
from position 0, every cache carried from one step to the next as the runtime carries it), then over all the rows
end to end as one row of ctx_len tokens (every position calibrated), and every step's inputs are a calibration
sample, so the cache inputs are calibrated on real keys and values.

Types: activations uint16, symmetric (zero point 32768); weights int8, symmetric, per output channel (MatMul weights per
tensor: QNN has no per-channel MatMul), except LayerNorm's scale and bias, uint8 per tensor (the HTP rejects
a 16-bit LayerNorm with int8 symmetric or per-channel weights: QNN validation error 3110). Per-tensor uint8
weights on every linear layer crashed the x86 HTP simulator (a segmentation fault) in a 32-token prefill
graph's attention output projection; per-channel int8 runs. Asymmetric uint16 activations crashed it too in
tiny-llama's prefill graph (the first residual Add); symmetric ones run. The graph keeps float inputs and
outputs: a QuantizeLinear after each input and a DequantizeLinear before each output, which run on the HTP
(the session's ``offload_graph_io_quantization`` is 0, :mod:`qgraph.targets.qnn`), so the runtime and
its retained caches are those of a float graph.

The calibration rows are token ids: the API tokenizes the user's prompts (``--calibration FILE``, one per
line) or :data:`CALIBRATION_PROMPTS` with the model's tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qgraph.errors import CompileError
from qgraph.ir.contract import RETAINED_SUFFIX, pad_chunk

log = logging.getLogger(__name__)

#: The built-in calibration set: short everyday English (greetings, small talk, plans, food, weather), the
#: register of the bundled models, with digits and punctuation so that their embeddings are seen too.
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "Hi there!! How are you today? I am fine, thank you. What did you do this morning?",
    "Hello! My name is Anna. It is nice to meet you. Do you want to go to the park with me after lunch?",
    "The weather is cold and rainy today, so we stayed at home, read a book and made a cake for dinner.",
    "Yesterday I went to the market with my brother. We bought apples, bread, cheese and 12 eggs.",
    "Good morning! I drink a cup of tea every morning. My favorite color is blue. See you later!",
    "Once upon a time, a small bird lived in a tall tree next to an old bridge. Every day it sang a song.",
    "Can you help me find my red umbrella? Of course, let us look together. It is on the chair by the door.",
    "The train leaves at 8:30 on Saturday. Tomorrow we will visit the museum, then eat pizza in the square.",
)


def check_calibration(rows: Any) -> list[list[int]]:
    """Rule: calibration is token ids, one or more non-empty rows of integers >= 0 (the API tokenizes prompts)."""
    ok = isinstance(rows, (list, tuple)) and len(rows) > 0
    ok = ok and all(isinstance(r, (list, tuple)) and r and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in r)
                    for r in rows)  # fmt: skip
    if not ok:
        raise CompileError("qnn's calibration is token ids: one or more non-empty rows of integers >= 0 "
                           "(text prompts are tokenized by qgraph generate/perplexity --calibration FILE, or the API)")  # fmt: skip
    return [list(r) for r in rows]


def calibration_steps(model_path: Path, rows: Sequence[Sequence[int]]) -> Iterator[dict[str, np.ndarray]]:
    """The inputs of every step the float graph at ``model_path`` makes over ``rows`` (made lazily, one step at a time)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    batch, width = (int(d) for d in inputs["input_ids"].shape)
    names = [n for n in inputs if n.startswith(("past_key.", "past_value."))]
    shape = tuple(int(d) for d in inputs[names[0]].shape)
    dtype = np.float16 if inputs[names[0]].type == "tensor(float16)" else np.float32
    ctx_len = shape[2]
    outputs = [n + RETAINED_SUFFIX for n in names]
    # Then the rows end to end (cycled) as one row of ctx_len tokens: every position the artifact can run is calibrated.
    # Ranges that grow with the position (a rotary embedding's angle, position x inv_freq) are clipped past the last
    # one calibrated: tiny-llama's decode graph calibrated on the rows alone (positions up to about 30) computed
    # angles of 40 at position 44, and its w8a16 perplexity was 2.5x the float one's.
    joined = [t for r in rows for t in r]
    rows = [*rows, (joined * (ctx_len // max(1, len(joined)) + 1))[:ctx_len]] if joined else list(rows)
    for row in rows:
        cache = {n: np.zeros(shape, dtype) for n in names}
        # Whole chunks that fit the cache, as the runtime feeds them (a chunk's first position + width <= ctx_len).
        for start in range(0, min(len(row), ctx_len - width + 1), width):
            ids, pos = pad_chunk([row[start : start + width]] + [[]] * (batch - 1), [start] * batch, width)
            feeds = {"input_ids": ids, "position_ids": pos, **cache}
            yield feeds
            cache = dict(zip(names, sess.run(outputs, feeds), strict=True))


def _drop_metadata(path: Path) -> None:
    """Remove the model's metadata_props (``qgraph export``'s ``qgraph.max_positions``) from ``path``'s header in place:
    ONNX Runtime 1.32's ``qnn_preprocess_model`` merges them into a dict as if they were pairs and raises TypeError."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if model.metadata_props:
        del model.metadata_props[:]
        onnx.save(model, str(path))


def quantize_w8a16(src: Path, out: Path, rows: Sequence[Sequence[int]]) -> int:
    """Write the QDQ model of the float model ``src`` to ``out`` (weights in ``out``'s external data); returns the samples."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    pre = out.with_name(out.stem + ".pre.onnx")
    _drop_metadata(src)
    made = qnn_preprocess_model(
        str(src), str(pre), save_as_external_data=True, all_tensors_to_one_file=True, external_data_location=pre.name + ".data"
    )
    model_path = pre if made else src
    counted = [0]

    class Steps(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.steps = calibration_steps(model_path, rows)

        def get_next(self) -> dict[str, np.ndarray] | None:
            step = next(self.steps, None)
            counted[0] += step is not None
            return step

    model = onnx.load(str(model_path))
    # LayerNorm's scale and bias per tensor in uint8 (see the module docstring); every other weight int8 per channel,
    # but the constants of rotary angles in 16 bits (rotary_constants).
    overrides = {n.input[i]: [{"quant_type": QuantType.QUInt8, "symmetric": False}] for n in model.graph.node
                 if n.op_type == "LayerNormalization" for i in (1, 2) if len(n.input) > i and n.input[i]}  # fmt: skip
    rotary = rotary_constants(model)
    overrides.update({name: [{"quant_type": QuantType.QInt16, "symmetric": True}] for name in rotary})
    log.info("w8a16: rotary constants in 16 bits: %s", rotary or "none")
    config = get_qnn_qdq_config(model, Steps(), activation_type=QuantType.QUInt16, activation_symmetric=True,
                                weight_type=QuantType.QInt8, per_channel=True, init_overrides=overrides)  # fmt: skip
    config.use_external_data_format = True
    quantize(model, str(out), config)
    for p in (pre, pre.with_name(pre.name + ".data")):
        p.unlink(missing_ok=True)
    if counted[0] == 0:
        raise CompileError(f"no calibration step fits {src.name}: every calibration row is empty; give longer prompts")
    log.info("quantized %s to w8a16 (QDQ) on %d calibration steps", src.name, counted[0])
    return counted[0]


#: Ops between a rotary embedding's constant frequencies and its Cos/Sin: the angle's computation.
_ANGLE_OPS = frozenset({"Mul", "MatMul", "Cast", "Concat", "Transpose", "Reshape", "Unsqueeze", "Expand", "Squeeze"})


def rotary_constants(model: Any) -> list[str]:
    """The initializers a Cos or Sin reads through the angle's ops (``_ANGLE_OPS``, up to 6 deep): a rotary
    embedding's ``inv_freq`` (and a scaling factor).

    As int8 weights they break RoPE: a Llama's ``inv_freq`` runs from 1 down to about 1e-4, and int8's one scale
    per tensor (1/127) rounds the low frequencies to 0 or 0.008, an angle error of position x 0.004 rad (0.13 at
    position 32, in every rotated query and key). In 16 bits the error is position x 1.5e-5 rad.
    """
    from onnx import TensorProto

    # Only float constants: a Reshape's or an Expand's int64 shape is not quantized.
    floats = {t.name for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    producer = {o: n for n in model.graph.node for o in n.output}
    found: set[str] = set()
    frontier = [n.input[0] for n in model.graph.node if n.op_type in ("Cos", "Sin") and n.input]
    seen: set[str] = set()
    for _ in range(6):
        nxt = []
        for name in frontier:
            if name in seen:
                continue
            seen.add(name)
            if name in floats:
                found.add(name)
                continue
            node = producer.get(name)
            if node is not None and node.op_type in _ANGLE_OPS and not node.domain:
                nxt += [i for i in node.input if i]
        frontier = nxt
    return sorted(found)


__all__ = ["CALIBRATION_PROMPTS", "calibration_steps", "check_calibration", "quantize_w8a16", "rotary_constants"]
