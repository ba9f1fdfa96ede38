"""``qgraph compile``: one pinned graph per specialization, built for a target.

A compile takes an optimized graph (or a raw export, which it optimizes first),
pins one graph per specialization (prefill: seq_len = P; decode: seq_len = 1),
applies the target's legalization passes, hands each graph to the target's
compiler, and writes an artifact directory:

* ``manifest.json``: qgraph version, target and options, specializations with
  their files and shapes, the IO contract, the pass reports, content hashes,
  and ``prefill_positions``: ``"consecutive"`` where the prefill graph takes
  the runtime's chunks only (``fuse-decode-attention`` rewrote it: in each row,
  consecutive positions from the chunk's first token, padding -1 only after
  them, and the first position + prefill_seq_len <= ctx_len), else ``"any"``;
* the compiled graph of each specialization;
* ``weights.data``: the weights, stored once and shared by the specializations.

The directory is built under a temporary name beside ``out_dir`` and renamed
when complete, so a failed or killed compile leaves nothing half-written. A
killed compile can leave its hidden ``.<name>.tmp-<pid>-*`` folder behind; the
next compile into the same place removes such folders once they are an hour
old and their process is gone.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qgraph.artifact.atomic import remove_stale_temps, replace_dir
from qgraph.artifact.manifest import MANIFEST, Manifest, Specialization, sha256_file
from qgraph.errors import QGraphError
from qgraph.ir.graph import Graph, remove_model_files
from qgraph.pipeline.facts import PREFILL_CHUNKS_CONSECUTIVE
from qgraph.pipeline.optimize import optimize
from qgraph.targets import get_target
from qgraph.version import __version__

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class CompileError(QGraphError):
    """A compile could not be done with these inputs or options."""


def is_retained(graph: Graph) -> bool:
    """True if the graph already follows the retained-state contract."""
    return any(t.name.endswith("_RetainedState") for t in graph.outputs)


def io_contract(graph: Graph) -> dict[str, Any]:
    def desc(t: Any) -> dict[str, Any]:
        return {"name": t.name, "dtype": str(np.dtype(t.dtype)) if t.dtype is not None else None, "shape": list(t.shape or [])}

    return {"inputs": [desc(t) for t in graph.inputs], "outputs": [desc(t) for t in graph.outputs]}


def model_info(graph: Graph) -> dict[str, Any]:
    """Layers, heads, head size, vocabulary and dtype, read off a retained-state graph."""
    kv = [t for t in graph.inputs if t.name.startswith("past_key.")]
    if not kv or kv[0].shape is None:
        raise CompileError("the graph has no past_key.{i} inputs; it does not follow the retained-state contract")
    shape = list(kv[0].shape)
    logits = next((t for t in graph.outputs if t.name == "logits"), None)
    return {
        "n_layer": len(kv),
        "n_head": shape[1],
        "head_dim": shape[3],
        "ctx_len": shape[2],
        "vocab_size": logits.shape[-1] if logits is not None and logits.shape else None,
        "dtype": str(np.dtype(kv[0].dtype or np.float32)),
    }


def _say(progress: Progress | None, msg: str) -> None:
    log.info("%s", msg)
    if progress is not None:
        progress(msg)


def compile_model(
    source: str | Path | Graph,
    target: str,
    out_dir: str | Path,
    *,
    prefill_seq_len: int = 32,
    ctx_len: int | None = None,
    batch_size: int = 1,
    options: dict[str, Any] | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Compile ``source`` for ``target`` into ``out_dir``; returns the directory."""
    impl = get_target(target)
    options = impl.check_options(dict(options or {}))
    if batch_size < 1:
        raise CompileError(f"batch size must be at least 1, got {batch_size}")
    if prefill_seq_len < 1:
        raise CompileError(f"prefill length must be at least 1, got {prefill_seq_len}")
    start = time.perf_counter()
    graph = source if isinstance(source, Graph) else Graph.load(source)
    reports: dict[str, Any] = {}
    if not is_retained(graph):
        _say(progress, f"optimizing ({graph.node_count()} nodes)")
        report = optimize(graph, ctx_len=ctx_len)
        reports["optimize"] = report.to_dict()
    info = model_info(graph)
    graph_ctx = info["ctx_len"]
    if ctx_len is not None and ctx_len != graph_ctx:
        raise CompileError(
            f"the graph's cache holds {graph_ctx} tokens but ctx_len {ctx_len} was asked; re-optimize with --ctx-len {ctx_len}"
        )
    ctx_len = int(graph_ctx)
    if prefill_seq_len > ctx_len:
        raise CompileError(f"the prefill length {prefill_seq_len} is larger than ctx_len {ctx_len}; use --prefill-seq-len <= {ctx_len}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, (f".{out.name}.tmp-", f".{out.name}.old-"))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary folder
        base = tmp / "optimized.onnx"
        graph.save(base, external=True)
        specs = [Specialization("prefill", batch_size, prefill_seq_len, ctx_len), Specialization("decode", batch_size, 1, ctx_len)]
        chunked = False
        for spec in specs:
            _say(progress, f"pinning {spec.name} (batch {spec.batch_size}, seq_len {spec.seq_len}, ctx_len {ctx_len})")
            g = Graph.load(base)
            report = optimize(g, ["pin-static-shapes", "cleanup", *impl.legalize_passes(options), "simplify-shapes",
                                  *impl.final_passes(options), "cleanup"],
                              ctx_len=ctx_len, batch_size=spec.batch_size, seq_len=spec.seq_len)  # fmt: skip
            reports[spec.name] = report.to_dict()
            chunked = chunked or PREFILL_CHUNKS_CONSECUTIVE in report.facts
            _say(progress, f"compiling {spec.name} for {target}")
            impl.compile_spec(g, tmp, spec, options, dry_run=dry_run)
        extra = impl.finish(tmp, base, specs, options, dry_run=dry_run, progress=progress) or {}
        if not impl.keeps_base:
            remove_model_files(base)
        manifest = Manifest(
            qgraph_version=__version__,
            target=target,
            target_options=options,
            batch_size=batch_size,
            ctx_len=ctx_len,
            prefill_seq_len=prefill_seq_len,
            specializations=specs,
            io=io_contract(graph),
            model=info,
            pass_reports=reports,
            fed_weights=extra.get("fed_weights", {}),
            prefill_positions="consecutive" if chunked else "any",
        )
        manifest.hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(manifest.to_json())
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(progress, f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return out
