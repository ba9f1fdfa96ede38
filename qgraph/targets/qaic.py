"""Cloud AI 100 inputs: specializations.json, custom_io.yaml and the qaic-exec command.

The SDK cannot be installed everywhere, so these are plain text builders that
the tests compare with golden files; ``QaicTarget`` runs the command where the
SDK is present.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qgraph.ir.files import remove_model_files
from qgraph.ir.graph import Graph
from qgraph.targets.base import Target, TargetError

if TYPE_CHECKING:
    from qgraph.artifact.manifest import Specialization

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


QAIC_SDK = Path("/opt/qti-aic")
QAIC_EXEC = QAIC_SDK / "exec" / "qaic-exec"


class QaicTarget(Target):
    """Cloud AI 100: specializations.json, custom_io.yaml and the qaic-exec command."""

    name = "qaic"
    keeps_base = True
    defaults: dict[str, Any] = {"aic_hw_version": "2.0", "num_cores": 16, "kv_dtype": "float16", "mxfp6_matmul": False,
                                "convert_to_fp16": True}  # fmt: skip
    #: None: qaic-exec lowers the ONNX ops itself, and compiles the symbolic optimized graph (the pinned copies only prove each shape).
    slots: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        opts = super().check_options(options)
        if opts["kv_dtype"] not in ("float16", "float32"):
            raise TargetError(f"kv_dtype must be float16 or float32, not {opts['kv_dtype']!r}")
        if not 1 <= int(opts["num_cores"]) <= 16:
            raise TargetError(f"num_cores must be 1..16 (a Cloud AI 100 card has 16), not {opts['num_cores']}")
        return opts

    def compile_spec(self, graph: Graph, out_dir: Path, spec: Specialization, options: dict[str, Any], *, dry_run: bool) -> None:
        # qaic-exec specializes one symbolic graph itself; pinning here proved each specialization is static.
        spec.file = "model.onnx"

    def finish(self, out_dir: Path, base: Path, specs: list[Specialization], options: dict[str, Any], *, dry_run: bool,
               progress: Callable[[str], None] | None) -> None:  # fmt: skip
        g = Graph.load(base)
        g.save(out_dir / "model.onnx", external=True)
        (out_dir / "specializations.json").write_text(specializations_json(specs, g))
        (out_dir / "custom_io.yaml").write_text(custom_io_yaml(g, options["kv_dtype"]))
        cmd = command(out_dir, options)
        (out_dir / "qaic_compile.sh").write_text("#!/bin/sh\n# Run from this directory.\n" + " \\\n  ".join(cmd) + "\n")
        remove_model_files(base)
        if dry_run:
            if progress:
                progress("dry run: " + " ".join(cmd))
            return
        if not QAIC_EXEC.is_file():
            raise TargetError(f"the Cloud AI 100 SDK is not installed ({QAIC_EXEC} is missing); "
                              "use --dry-run to write its inputs and print the command")  # fmt: skip
        result = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True)
        if result.returncode != 0:
            raise TargetError(f"qaic-exec failed ({result.returncode}): {(result.stderr or result.stdout).strip()[-500:]}")
