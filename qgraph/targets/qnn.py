"""Qualcomm QNN HTP through onnxruntime-qnn: register the EP, compile, run.

onnxruntime-qnn is a *plugin* execution provider: a separate wheel
(``onnxruntime_qnn``, QNN SDK inside) beside the ``onnxruntime`` package, which
it does not replace. Its library is registered with ONNX Runtime once per
process, then sessions ask for it by device::

    import onnxruntime as ort, onnxruntime_qnn
    ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    so = ort.SessionOptions()
    so.add_provider_for_devices(devices, {"backend_type": "htp", "soc_model": "60"})

On x86-64 the HTP backend is a functional simulator; its device is reported as
a CPU device, and ``soc_model`` must be given (the default fails at finalize).

The EP falls back to the CPU silently, so every session here records where
ONNX Runtime placed each node (``session.record_ep_graph_assignment_info``) and
raises :class:`~qgraph.errors.PlacementError` naming the nodes that would run on
the CPU, unless CPU fallback is allowed.

Compiling writes an *EP-context* model: a small ONNX file whose ``EPContext``
node points at the compiled QNN context binary. The binary is kept in a
separate file beside it (``<stem>_qnn.bin``, embed mode 0), not embedded: an
embedded binary of a real model runs into protobuf's 2 GB limit, and a separate
file can be hashed and memory-mapped on its own. The two files must stay in one
folder (the model names the binary by a relative path).

onnxruntime-qnn is imported lazily: qgraph itself does not need it.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qgraph.errors import CompileError, MissingDependencyError, PlacementError, StaticShapeError
from qgraph.ir.files import remove_model_files
from qgraph.ir.graph import Graph
from qgraph.targets.base import Target
from qgraph.targets.qnn_quant import check_calibration, quantize_w8a16

if TYPE_CHECKING:
    import onnxruntime as ort

    from qgraph.artifact.manifest import Specialization

log = logging.getLogger(__name__)

EP_NAME = "QNNExecutionProvider"
#: A SoC model the x86 HTP simulator accepts (the EP's default fails at finalize there).
DEFAULT_SOC_MODEL = 60
INSTALL_HINT = "install the qnn extra: pip install 'qgraph[qnn]'"
#: How many CPU-placed nodes a PlacementError message names before "...".
_LISTED = 20

_lock = threading.Lock()
_devices: list[Any] | None = None


@dataclass
class CompileReport:
    """What :func:`compile_context` did."""

    out_path: Path
    seconds: float
    nodes_on_qnn: int
    nodes_on_cpu: list[tuple[str, str]] = field(default_factory=list)  # (name, op type)
    #: Files besides ``out_path`` that the EP-context model needs (the context binary).
    extra_files: list[Path] = field(default_factory=list)


def qnn_available() -> bool:
    """True if onnxruntime-qnn is installed (it is not imported here)."""
    try:
        return importlib.util.find_spec("onnxruntime_qnn") is not None
    except (ImportError, ValueError):
        return False


def _modules() -> tuple[Any, Any]:
    try:
        import onnxruntime as ort
        import onnxruntime_qnn
    except ImportError as e:
        raise MissingDependencyError(f"the qnn target needs onnxruntime-qnn ({e}); {INSTALL_HINT}") from None
    if not hasattr(ort, "register_execution_provider_library"):
        raise MissingDependencyError(
            f"onnxruntime {ort.__version__} cannot load plugin execution providers; upgrade it (onnxruntime-qnn needs 1.24 or newer)"
        )
    return ort, onnxruntime_qnn


def register() -> list[ort.OrtEpDevice]:
    """Register the QNN EP library (once per process); return the HTP devices to use.

    A library registered earlier by someone else (under any name) is reused.
    NPU devices are preferred; where there is none (the x86 simulator reports
    its HTP as a CPU device) the EP's CPU-type devices are used. GPU devices
    belong to the QNN GPU backend and are never returned.
    """
    global _devices
    with _lock:
        if _devices is not None:
            return list(_devices)
        ort, qnn = _modules()
        ep_name = qnn.get_ep_name() if hasattr(qnn, "get_ep_name") else EP_NAME
        if not any(d.ep_name == ep_name for d in ort.get_ep_devices()):
            path = qnn.get_library_path()
            try:
                ort.register_execution_provider_library(ep_name, path)
            except Exception as e:
                raise MissingDependencyError(f"onnxruntime could not load the QNN EP library {path}: {e}; {INSTALL_HINT}") from None
        ours = [d for d in ort.get_ep_devices() if d.ep_name == ep_name]
        kind = ort.OrtHardwareDeviceType
        chosen = [d for d in ours if d.device.type == kind.NPU] or [d for d in ours if d.device.type == kind.CPU]
        if not chosen:
            found = ", ".join(str(d.device.type) for d in ours) or "none"
            raise MissingDependencyError(
                f"the QNN EP found no HTP device (its devices: {found}); run on a Snapdragon with an HTP or on x86-64 Linux (the simulator)"
            )
        log.debug("QNN EP devices: %s", [(str(d.device.type), d.device.vendor) for d in chosen])
        _devices = chosen
        return list(chosen)


def provider_options(soc_model: int = DEFAULT_SOC_MODEL, fp16: bool = False, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The QNN EP's options for the HTP backend.

    ``fp16`` sets ``enable_htp_fp16_precision``: float32 graphs compute in fp16
    on the HTP. On the x86 simulator the results are identical either way (it
    computes float32 graphs in fp16 regardless); on a device, False asks for
    float32 precision where the HTP has it. ``extra`` adds or overrides options
    (values are turned into strings, as the EP wants them).
    """
    opts = {
        "backend_type": "htp",
        "soc_model": str(int(soc_model)),
        "enable_htp_fp16_precision": "1" if fp16 else "0",
        # A QDQ graph's QuantizeLinear after each float input and DequantizeLinear before each output run on the
        # HTP too (the EP leaves them to the CPU by default); a float graph has none.
        "offload_graph_io_quantization": "0",
    }
    opts.update({str(k): str(v) for k, v in (extra or {}).items()})
    return opts


def _session_options(soc_model: int, fp16: bool, *, fallback: bool, threads: int | None = None) -> ort.SessionOptions:
    ort, _ = _modules()
    devices = register()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if fallback else "1")
    so.add_provider_for_devices(devices, provider_options(soc_model, fp16))
    return so


def placement(session: ort.InferenceSession) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(nodes on QNN, nodes elsewhere) of a session made with assignment recording on."""
    on_qnn: list[tuple[str, str]] = []
    other: list[tuple[str, str]] = []
    for sub in session.get_provider_graph_assignment_info():
        nodes = [(n.name, n.op_type) for n in sub.get_nodes()]
        (on_qnn if sub.ep_name == EP_NAME else other).extend(nodes)
    return on_qnn, other


def _placement_error(path: Path, on_qnn: int, on_cpu: list[tuple[str, str]]) -> PlacementError:
    shown = ", ".join(f"{name or '<unnamed>'} ({op})" for name, op in on_cpu[:_LISTED])
    more = f" and {len(on_cpu) - _LISTED} more" if len(on_cpu) > _LISTED else ""
    hint = "; legalize them (the legalize-qnn pass) or pass --allow-cpu-fallback"
    if on_qnn == 0:
        hint += "; QNN took no node at all: check soc_model and that every shape is static"
    n = len(on_cpu)
    return PlacementError(f"{path.name}: {n} node{'s' if n != 1 else ''} would fall back to the CPU: {shown}{more}{hint}", on_cpu)


def _check_static(model_path: Path) -> None:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if not vi.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise StaticShapeError(
                f"{model_path.name}: '{vi.name}' has shape {shape}; QNN needs static shapes "
                "(pin them first: optimize with batch_size and seq_len, or qgraph compile)"
            )


def context_files(context_model_path: Path) -> list[Path]:
    """The files an EP-context model's EPContext nodes name (embed mode 0), beside it."""
    import onnx

    model = onnx.load(str(context_model_path), load_external_data=False)
    files = []
    for node in model.graph.node:
        if node.op_type != "EPContext":
            continue
        attrs = {a.name: a for a in node.attribute}
        embedded = attrs.get("embed_mode")
        if embedded is not None and embedded.i == 0 and "ep_cache_context" in attrs:
            path = (context_model_path.parent / attrs["ep_cache_context"].s.decode()).resolve()
            if path.parent == context_model_path.parent.resolve():  # never a file elsewhere
                files.append(context_model_path.parent / path.name)
    return files


def compile_context(
    model_path: Path,
    out_path: Path,
    *,
    soc_model: int = DEFAULT_SOC_MODEL,
    fp16: bool = False,
    allow_cpu_fallback: bool = False,
) -> CompileReport:
    """Compile a static-shape ONNX model offline into an EP-context model at ``out_path``.

    The QNN context binary goes beside it as ``<out stem>_qnn.bin`` (see the
    module docstring). Placement is recorded while compiling: if any node
    would run on the CPU and ``allow_cpu_fallback`` is False, nothing is left
    at ``out_path`` and :class:`PlacementError` names those nodes.
    """
    ort, _ = _modules()
    model_path, out_path = Path(model_path), Path(out_path)
    _check_static(model_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # ONNX Runtime refuses to overwrite an EP-context model; a compile replaces it.
    if out_path.is_file():
        try:
            old = context_files(out_path)
        except Exception:  # not an EP-context model: just the file is replaced
            old = []
        for p in [*old, out_path]:
            p.unlink(missing_ok=True)
    # Fallback stays on here so the session is built and placement can be read.
    so = _session_options(soc_model, fp16, fallback=True)
    so.add_session_config_entry("ep.context_enable", "1")
    so.add_session_config_entry("ep.context_file_path", str(out_path))
    so.add_session_config_entry("ep.context_embed_mode", "0")
    start = time.perf_counter()
    session = ort.InferenceSession(str(model_path), so)
    seconds = time.perf_counter() - start
    on_qnn, on_cpu = placement(session)
    del session
    extra = context_files(out_path) if out_path.is_file() else []
    if on_cpu and not allow_cpu_fallback:
        for p in [out_path, *extra]:
            p.unlink(missing_ok=True)
        raise _placement_error(model_path, len(on_qnn), on_cpu)
    if not out_path.is_file():
        raise PlacementError(f"{model_path.name}: the QNN EP wrote no context model (no node was compiled for QNN)", on_cpu)
    if on_cpu:
        log.warning("%s: %d nodes run on the CPU (allowed): %s", model_path.name, len(on_cpu), on_cpu[:_LISTED])
    log.info("compiled %s for QNN HTP (soc_model %d) in %.2f s: %d nodes on QNN, %d on CPU",
             out_path.name, soc_model, seconds, len(on_qnn), len(on_cpu))  # fmt: skip
    return CompileReport(out_path, seconds, len(on_qnn), on_cpu, extra)


def create_session(
    context_model_path: Path,
    *,
    soc_model: int = DEFAULT_SOC_MODEL,
    fp16: bool = False,
    allow_cpu_fallback: bool = False,
    threads: int | None = None,
) -> ort.InferenceSession:
    """A session that runs an EP-context model (or any static model) on the HTP backend.

    CPU fallback is disabled unless allowed; placement is checked again and a
    node left to the CPU raises :class:`PlacementError`. ``threads`` sets the
    CPU provider's intra-op threads (used only by nodes that fall back).
    """
    ort, _ = _modules()
    path = Path(context_model_path)
    so = _session_options(soc_model, fp16, fallback=allow_cpu_fallback, threads=threads)
    try:
        session = ort.InferenceSession(str(path), so)
    except Exception as e:
        if allow_cpu_fallback or "fallback to CPU EP has been explicitly disabled" not in str(e):
            raise
        # Build it once more with fallback on, only to name the nodes.
        probe = ort.InferenceSession(str(path), _session_options(soc_model, fp16, fallback=True, threads=threads))
        on_qnn, on_cpu = placement(probe)
        raise _placement_error(path, len(on_qnn), on_cpu) from None
    on_qnn, on_cpu = placement(session)
    if on_cpu and not allow_cpu_fallback:
        raise _placement_error(path, len(on_qnn), on_cpu)
    return session


class QnnTarget(Target):
    """Qualcomm QNN HTP through onnxruntime-qnn: one EP-context model per specialization."""

    name = "qnn"
    inplace_kv = False
    #: ``calibration``: token-id rows that ``--quantize w8a16`` calibrates on (:mod:`qgraph.targets.qnn_quant`).
    defaults: dict[str, Any] = {"soc_model": None, "fp16": False, "allow_cpu_fallback": False, "calibration": None}
    slots = {
        # The few ops the HTP was measured to reject, rewritten into ones it takes (passes/legalize_qnn.py).
        "legalize": ("legalize-qnn",),
        # After simplify-shapes: the head merge it makes at one token, which the HTP miscomputes when batch == heads.
        "final": ("legalize-qnn-layout",),
    }

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        opts = super().check_options(options)
        if opts["soc_model"] is None:
            opts["soc_model"] = DEFAULT_SOC_MODEL
        if opts["calibration"] is not None:
            opts["calibration"] = check_calibration(opts["calibration"])
        return opts

    def compile_spec(self, graph: Graph, out_dir: Path, spec: Specialization, options: dict[str, Any], *, dry_run: bool,
                     quantize: str | None = None) -> None:  # fmt: skip
        src = out_dir / f"{spec.name}.src.onnx"
        graph.save(src, external=True)
        ctx = out_dir / f"{spec.name}.onnx"
        built = src
        if quantize == "w8a16":
            if not options["calibration"]:
                raise CompileError("--quantize w8a16 calibrates on token ids and none were given: compile through qgraph generate or "
                                   "perplexity (built-in prompts, or --calibration FILE) or the API (calibration=[[ids...]])")  # fmt: skip
            built = out_dir / f"{spec.name}.qdq.onnx"
            quantize_w8a16(src, built, options["calibration"])
        compile_context(built, ctx, soc_model=int(options["soc_model"]), fp16=bool(options["fp16"]),
                            allow_cpu_fallback=bool(options["allow_cpu_fallback"]))  # fmt: skip
        for path in {src, built}:
            remove_model_files(path)
        spec.file = ctx.name
        spec.extra_files = sorted(p.name for p in out_dir.iterdir() if p.name.startswith(spec.name) and p.name != ctx.name)

    def create_session(self, path: Path, options: dict[str, Any], *, threads: int | None = None) -> ort.InferenceSession:
        return create_session(path, soc_model=int(options["soc_model"]), fp16=bool(options["fp16"]),
                                  allow_cpu_fallback=bool(options["allow_cpu_fallback"]))  # fmt: skip
