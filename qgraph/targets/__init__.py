"""Device targets: how each one legalizes, compiles and runs a specialization.

A target turns each pinned specialization graph into files in the artifact
directory (``compile_spec``), finishes the directory (``finish``: e.g. one
shared weights file), and later opens a session on a compiled file
(``create_session``). ``cpu`` is ONNX Runtime's CPU provider, ``qnn`` the
Qualcomm QNN HTP backend from onnxruntime-qnn, ``qaic`` Cloud AI 100's
compiler (its inputs and command; the runtime is the SDK's).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qgraph.errors import QGraphError
from qgraph.graph import Graph, remove_model_files

if TYPE_CHECKING:
    import onnxruntime as ort

    from qgraph.compile import Specialization

log = logging.getLogger(__name__)


class TargetError(QGraphError):
    """A target was unknown, given bad options, or could not build or run."""


class Target:
    """The interface every target implements."""

    name = ""
    #: The runtime may bind each past input and its _RetainedState output to one buffer.
    inplace_kv = True
    #: The symbolic optimized graph stays in the artifact (qaic compiles it itself).
    keeps_base = False
    defaults: dict[str, Any] = {}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TargetError(f"unknown option(s) {unknown} for target {self.name}; it takes {sorted(self.defaults)}")
        return {**self.defaults, **{k: v for k, v in options.items() if v is not None}}

    def legalize_passes(self, options: dict[str, Any]) -> list[str]:
        """Passes run on each pinned specialization before simplify-shapes."""
        return []

    def final_passes(self, options: dict[str, Any]) -> list[str]:
        """Passes run on each pinned specialization after simplify-shapes (on its 2-D rows)."""
        return []

    def compile_spec(self, graph: Graph, out_dir: Path, spec: Specialization, options: dict[str, Any], *, dry_run: bool) -> None:
        raise NotImplementedError

    def finish(self, out_dir: Path, base: Path, specs: list[Specialization], options: dict[str, Any], *, dry_run: bool,
               progress: Callable[[str], None] | None) -> dict[str, Any] | None:  # fmt: skip
        """Called once after every specialization is compiled; may return extra manifest fields (``fed_weights``)."""

    def create_session(self, path: Path, options: dict[str, Any], *, threads: int | None = None) -> ort.InferenceSession:
        raise TargetError(f"target {self.name} has no runtime in qgraph")


class CpuTarget(Target):
    """ONNX Runtime's CPU provider: the compiled graph is ORT's optimized graph."""

    name = "cpu"
    #: MatMul weights of at least this many bytes are bound by the runtime instead of pre-packed (see finish).
    FEED_MIN_BYTES = 32 << 20
    defaults: dict[str, Any] = {"threads": None, "feed_min_bytes": FEED_MIN_BYTES}

    def legalize_passes(self, options: dict[str, Any]) -> list[str]:
        # ONNX Runtime's own attention kernel (a contrib op only this runtime knows).
        return ["fuse-attention"]

    def final_passes(self, options: dict[str, Any]) -> list[str]:
        # After simplify-shapes, whose 2-D regions would not grow through the fused op. Not fuse-skip-layer-norm:
        # ONNX Runtime's SkipLayerNormalization kernel is slower than its Add + LayerNormalization here (prefill
        # +1.7 ms, decode 0 to +0.09 ms/token, both orders of 300 alternating steps; PERFORMANCE.md).
        return ["fuse-decode-attention"]

    def _options(self, threads: int | None) -> ort.SessionOptions:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        return so

    def compile_spec(self, graph: Graph, out_dir: Path, spec: Specialization, options: dict[str, Any], *, dry_run: bool) -> None:
        import onnxruntime as ort

        src = out_dir / f"{spec.name}.src.onnx"
        graph.save(src, external=True)
        so = self._options(options.get("threads"))
        # EXTENDED fusions are portable across machines; ALL adds layout-specific ones at load time.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(out_dir / f"{spec.name}.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{spec.name}.weights")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise TargetError(f"ONNX Runtime could not build the {spec.name} graph: {str(e).splitlines()[0]}") from None
        remove_model_files(src)
        spec.file = f"{spec.name}.onnx"

    def finish(self, out_dir: Path, base: Path, specs: list[Specialization], options: dict[str, Any], *, dry_run: bool,
               progress: Callable[[str], None] | None) -> dict[str, Any]:  # fmt: skip
        from qgraph.weights import feed_large_weights, share_weights

        share_weights(out_dir, [out_dir / s.file for s in specs], "weights.data")
        # Large products (the vocabulary projection) run faster on ONNX Runtime's GEMV kernel over the
        # plain weight than pre-packed, and one bound copy serves both specializations.
        return {"fed_weights": feed_large_weights(out_dir, [out_dir / s.file for s in specs], int(options["feed_min_bytes"]))}

    def create_session(self, path: Path, options: dict[str, Any], *, threads: int | None = None) -> ort.InferenceSession:
        import onnxruntime as ort

        so = self._options(threads or options.get("threads"))
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Workers spin between the kernels of a run (waking a sleeping worker costs tens of microseconds per
        # kernel on a VM) and stop when the run returns, so prefill's and decode's pools and the Python loop
        # between steps never compete for the cores (spinning that outlived the run made prefill after decode
        # 104 ms instead of 60). Decode -0.5 to -0.6 ms/token against no spinning (PERFORMANCE.md).
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.force_spinning_stop", "1")
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class QnnTarget(Target):
    """Qualcomm QNN HTP through onnxruntime-qnn: one EP-context model per specialization."""

    name = "qnn"
    inplace_kv = False
    defaults: dict[str, Any] = {"soc_model": None, "fp16": False, "allow_cpu_fallback": False}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        from qgraph.targets import qnn

        opts = super().check_options(options)
        if opts["soc_model"] is None:
            opts["soc_model"] = qnn.DEFAULT_SOC_MODEL
        return opts

    def legalize_passes(self, options: dict[str, Any]) -> list[str]:
        return ["legalize-qnn"]

    def compile_spec(self, graph: Graph, out_dir: Path, spec: Specialization, options: dict[str, Any], *, dry_run: bool) -> None:
        from qgraph.targets import qnn

        src = out_dir / f"{spec.name}.src.onnx"
        graph.save(src, external=True)
        ctx = out_dir / f"{spec.name}.onnx"
        qnn.compile_context(src, ctx, soc_model=int(options["soc_model"]), fp16=bool(options["fp16"]),
                            allow_cpu_fallback=bool(options["allow_cpu_fallback"]))  # fmt: skip
        remove_model_files(src)
        spec.file = ctx.name
        spec.extra_files = sorted(p.name for p in out_dir.iterdir() if p.name.startswith(spec.name) and p.name != ctx.name)

    def create_session(self, path: Path, options: dict[str, Any], *, threads: int | None = None) -> ort.InferenceSession:
        from qgraph.targets import qnn

        return qnn.create_session(path, soc_model=int(options["soc_model"]), fp16=bool(options["fp16"]),
                                  allow_cpu_fallback=bool(options["allow_cpu_fallback"]))  # fmt: skip


QAIC_SDK = Path("/opt/qti-aic")
QAIC_EXEC = QAIC_SDK / "exec" / "qaic-exec"


class QaicTarget(Target):
    """Cloud AI 100: specializations.json, custom_io.yaml and the qaic-exec command."""

    name = "qaic"
    keeps_base = True
    defaults: dict[str, Any] = {"aic_hw_version": "2.0", "num_cores": 16, "kv_dtype": "float16", "mxfp6_matmul": False,
                                "convert_to_fp16": True}  # fmt: skip

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
        from qgraph.targets.qaic import command, custom_io_yaml, specializations_json

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


_TARGETS: dict[str, type[Target]] = {t.name: t for t in (CpuTarget, QnnTarget, QaicTarget)}


def get_target(name: str) -> Target:
    if name not in _TARGETS:
        raise TargetError(f"unknown target '{name}'; choose one of {', '.join(_TARGETS)}")
    return _TARGETS[name]()
