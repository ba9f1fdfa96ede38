"""Cloud AI 100 inputs: specializations.json, custom_io.yaml and the qaic-exec command.

The SDK cannot be installed everywhere, so these are plain text builders that
the tests compare with golden files; ``QaicTarget`` runs the command where the
SDK is present.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qgraph.graph import Graph

if TYPE_CHECKING:
    from qgraph.compile import Specialization

#: Where qaic-exec writes the compiled program, relative to the artifact directory.
BINARY_DIR = "qpc"


def specializations_json(specs: list[Specialization], graph: Graph) -> str:
    """One entry per specialization, keyed by the graph's symbolic dim names.

    The batch and sequence dims are named as ``input_ids``'s; ctx_len is
    already a number in the graph (retain-kv-cache fixed it), so it is no key.
    """
    ids = next((t for t in graph.inputs if t.name == "input_ids"), None)
    shape = list(ids.shape or []) if ids is not None else []
    if len(shape) != 2 or not all(isinstance(d, str) for d in shape):
        raise ValueError(f"input_ids must have two symbolic dims for qaic specializations, found {shape}")
    batch, seq = shape
    entries = [{batch: str(s.batch_size), seq: str(s.seq_len)} for s in specs]
    return json.dumps({"specializations": entries}, indent=4) + "\n"


def custom_io_yaml(graph: Graph, kv_dtype: str) -> str:
    """The KV inputs and their _RetainedState outputs, kept in ``kv_dtype`` on the device."""
    precision = {"float16": "float16", "float32": "float"}[kv_dtype]
    inputs = [t.name for t in graph.inputs if t.name.startswith(("past_key.", "past_value."))]
    outputs = [t.name for t in graph.outputs if t.name.endswith("_RetainedState")]
    lines = ["# Model Inputs", ""]
    for name in inputs:
        lines += [f" - IOName: {name}", f"   Precision: {precision}", ""]
    lines += ["# Model Outputs", ""]
    for name in outputs:
        lines += [f" - IOName: {name}", f"   Precision: {precision}", ""]
    return "\n".join(lines)


def command(artifact_dir: Path, options: dict[str, Any], exe: str = "/opt/qti-aic/exec/qaic-exec") -> list[str]:
    """The qaic-exec command line, with paths relative to the artifact directory."""
    cmd = [
        exe,
        "-m=model.onnx",
        "-aic-hw",
        f"-aic-hw-version={options['aic_hw_version']}",
        "-network-specialization-config=specializations.json",
        "-retained-state",
        f"-aic-num-cores={int(options['num_cores'])}",
        "-custom-IO-list-file=custom_io.yaml",
        "-compile-only",
        f"-aic-binary-dir={BINARY_DIR}",
    ]
    if options.get("convert_to_fp16", True):
        cmd.insert(5, "-convert-to-fp16")
    if options.get("mxfp6_matmul"):
        cmd.append("-mxfp6-matmul")
    return cmd
