"""ONNX Runtime's CPU provider: the compiled graph is ONNX Runtime's optimized graph."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qgraph.artifact.weights import feed_large_weights, share_weights
from qgraph.ir.files import remove_model_files
from qgraph.ir.graph import Graph
from qgraph.targets.base import Target, TargetError

if TYPE_CHECKING:
    import onnxruntime as ort

    from qgraph.artifact.manifest import Specialization


class CpuTarget(Target):
    """ONNX Runtime's CPU provider: the compiled graph is ORT's optimized graph."""

    name = "cpu"
    #: MatMul weights of at least this many bytes are bound by the runtime instead of pre-packed (see finish).
    FEED_MIN_BYTES = 32 << 20
    defaults: dict[str, Any] = {"threads": None, "feed_min_bytes": FEED_MIN_BYTES}

    slots = {
        # One RotaryEmbedding kernel per rotated q or k (QNN and qaic keep the elementwise form); before
        # fuse-attention, which then finds the usual head split after it. ONNX Runtime's own attention kernel
        # (a contrib op only this runtime knows).
        "legalize": ("fuse-rotary", "fuse-attention"),
        # One kernel per layer for the cache writes and attention of a step (decode, and a one-row prompt chunk).
        # Not fuse-skip-layer-norm: ONNX Runtime's SkipLayerNormalization kernel is slower than its Add +
        # LayerNormalization here (prefill +1.7 ms, decode 0 to +0.09 ms/token, both orders of 300 alternating
        # steps; PERFORMANCE.md).
        # fuse-skip-rms-norm: a residual Add and the RMSNormalization reading it in one kernel (Llama family; int4
        # decode about -0.1 ms/token on the bench's Llama shape, fp32 within the noise: passes/fuse_skip_rms_norm.py).
        # fuse-attention-rotary: a decode step's q/k rotary embeddings inside GroupQueryAttention (do_rotary), as
        # onnxruntime-genai's graphs have it (passes/fuse_attention_rotary.py).
        "final": ("fuse-decode-attention", "fuse-attention-rotary", "fuse-skip-rms-norm"),
    }

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        opts = super().check_options(options)
        threads = opts["threads"]
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise TargetError(f"threads must be an integer of at least 1 (leave it out for ONNX Runtime's default), not {threads!r}")
        return opts

    def _options(self, threads: int | None) -> ort.SessionOptions:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        return so

    def compile_spec(self, graph: Graph, out_dir: Path, spec: Specialization, options: dict[str, Any], *, dry_run: bool,
                     quantize: str | None = None) -> None:  # fmt: skip
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
