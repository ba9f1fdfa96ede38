"""Cloud AI 100 inputs: specializations.json, custom_io.yaml and the qaic-exec command.

The SDK cannot be installed everywhere, so these are plain text builders that
the tests compare with golden files and check against the written model.onnx;
``QaicTarget`` runs the command where the SDK is present. qaic-exec compiles
one symbolic graph for every specialization, so each symbolic dim of the graph's
inputs and outputs must be one that a specialization sets (input_ids's batch
and sequence dims), and a dim already fixed must equal every specialization's.
A dry run marks its manifest ``dry_run``: nothing in it was compiled.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qgraph.ir.files import process_umask, remove_model_files
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
    A graph whose dims qaic-exec could not specialize this way is refused.
    """
    ids = next((t for t in graph.inputs if t.name == "input_ids"), None)
    shape = list(ids.shape or []) if ids is not None else []
    if len(shape) != 2:
        raise TargetError(f"qaic needs an input_ids input of shape [batch, seq_len], found {shape if ids is not None else 'none'}")
    entries: list[dict[str, str]] = [{} for _ in specs]
    for dim, field in zip(shape, ("batch_size", "seq_len")):
        for entry, s in zip(entries, specs):
            want = getattr(s, field)
            if isinstance(dim, str):
                entry[dim] = str(want)
            elif dim != want:
                raise TargetError(
                    f"input_ids is fixed at {shape} but the {s.name} specialization takes {field} {want}: qaic-exec compiles one "
                    "graph for every specialization; compile the raw export or an optimized graph without --batch-size/--seq-len"
                )
    for t in [*graph.inputs, *graph.outputs]:
        loose = [d for d in (t.shape or []) if isinstance(d, str) and d not in entries[0]]
        if loose:
            raise TargetError(f"dim '{loose[0]}' of {t.name} is symbolic but is not input_ids's batch or sequence dim, which "
                              "the specializations set; qaic-exec needs every dim set (pin it first)")  # fmt: skip
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
    dry_runs = True
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

    def compile_spec(self, graph: Graph, out_dir: Path, spec: Specialization, options: dict[str, Any], *, dry_run: bool,
                     quantize: str | None = None) -> None:  # fmt: skip
        # qaic-exec specializes one symbolic graph itself; pinning here proved each specialization is static.
        spec.file = "model.onnx"

    def finish(self, out_dir: Path, base: Path, specs: list[Specialization], options: dict[str, Any], *, dry_run: bool,
               progress: Callable[[str], None] | None) -> dict[str, Any]:  # fmt: skip
        g = Graph.load(base)
        spec_text = specializations_json(specs, g)  # before anything is written: a graph qaic-exec cannot take fails here
        g.save(out_dir / "model.onnx", external=True)
        (out_dir / "specializations.json").write_text(spec_text)
        (out_dir / "custom_io.yaml").write_text(custom_io_yaml(g, options["kv_dtype"]))
        cmd = command(out_dir, options)
        script = out_dir / "qaic_compile.sh"
        script.write_text("#!/bin/sh\n# Run from this directory.\n" + " \\\n  ".join(cmd) + "\n")
        script.chmod(0o777 & ~process_umask())  # a script: executable, as the umask allows
        remove_model_files(base)
        if dry_run:
            if progress:
                progress("dry run: " + " ".join(cmd))
            return {"dry_run": True}
        if not QAIC_EXEC.is_file():
            raise TargetError(f"the Cloud AI 100 SDK is not installed ({QAIC_EXEC} is missing); "
                              "use --dry-run to write its inputs and print the command")  # fmt: skip
        result = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True)
        if result.returncode != 0:
            raise TargetError(f"qaic-exec failed ({result.returncode}): {(result.stderr or result.stdout).strip()[-500:]}")
        return {}
