"""``qgraph compile``: one pinned graph per specialization, built for a target.

A compile takes an optimized graph (or a raw export, which it rewrites first
with the declared pipeline's rewrite stage), gives each specialization
(prefill: prefill_seq_len tokens; decode: one) its own copy, runs the declared
specialization stage on it with the target's slots filled
(:mod:`qgraph.pipeline.stages`), hands each graph to the target's compiler,
and writes an artifact directory. The order of every pass is checked before
any of them runs.

* ``manifest.json`` (:mod:`qgraph.artifact.manifest`): qgraph version, target,
  the resolved options, specializations with their files, the IO contract,
  the pass reports, the sha256 of every file (checked when the artifact is
  opened, :mod:`qgraph.artifact.verify`), ``dry_run`` (the target wrote its
  compiler's inputs only), and ``prefill_positions``:
  ``"consecutive"`` where the prefill graph takes the runtime's chunks only
  (``fuse-decode-attention`` reported it rewrote a chunk: in each row,
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
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from qgraph.artifact.atomic import building
from qgraph.artifact.manifest import MANIFEST, Manifest, Specialization, model_info, specializations
from qgraph.artifact.verify import hash_tree
from qgraph.errors import CompileError, OptionError
from qgraph.ir.files import remove_model_files
from qgraph.ir.graph import Graph
from qgraph.pipeline.facts import KV_RETAINED, PREFILL_CHUNKS_CONSECUTIVE, observe
from qgraph.pipeline.optimize import graph_max_positions, graph_max_positions_why, retained_cache_len, run_passes
from qgraph.pipeline.options import Options
from qgraph.pipeline.registry import check_order, check_quantizable
from qgraph.pipeline.stages import compile_pipeline
from qgraph.targets import get_target
from qgraph.version import __version__

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def io_contract(graph: Graph) -> dict[str, Any]:
    def desc(t: Any) -> dict[str, Any]:
        return {"name": t.name, "dtype": str(np.dtype(t.dtype)) if t.dtype is not None else None, "shape": list(t.shape or [])}

    return {"inputs": [desc(t) for t in graph.inputs], "outputs": [desc(t) for t in graph.outputs]}


def check_pinned(graph: Graph, spec: Specialization) -> None:
    """A specialization's graph takes its shape: a graph already pinned to another one cannot be re-pinned."""
    ids = next((t for t in graph.inputs if t.name == "input_ids"), None)
    shape = list(ids.shape or []) if ids is not None else []
    if shape != [spec.batch_size, spec.seq_len]:
        raise CompileError(
            f"the {spec.name} specialization takes input_ids [{spec.batch_size}, {spec.seq_len}] but the graph's is {shape}: it was "
            "pinned to other shapes; compile the raw export or a graph optimized without --batch-size/--seq-len"
        )


def _say(progress: Progress | None, msg: str) -> None:
    log.info("%s", msg)
    if progress is not None:
        progress(msg)


def compile_model(
    source: str | Path | Graph,
    target: str,
    out_dir: str | Path,
    *,
    prefill_seq_len: int | None = None,
    ctx_len: int | None = None,
    batch_size: int | None = None,
    options: dict[str, Any] | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    quantize: str | None = None,
    quant_block_size: int | None = None,
    quant_vocab: str | None = None,
) -> Path:
    """Compile ``source`` for ``target`` into ``out_dir``; returns the directory.

    The numbers are those asked for (None: the default), ``options`` the
    target's, ``quantize`` a weight-only mode (int8, int4) or None; they are resolved once against the graph (:meth:`Options.resolve`:
    its position table caps the default ctx_len, and an already retained
    graph's cache length is its default ctx_len).
    """
    impl = get_target(target)
    impl.check_dry_run(dry_run)  # before the graph is read
    graph = source if isinstance(source, Graph) else Graph.load(source)
    opts = Options.resolve(ctx_len=ctx_len, prefill_seq_len=prefill_seq_len, batch_size=batch_size, target_options=options, target=impl,
                           max_positions=graph_max_positions(graph), max_positions_why=graph_max_positions_why(graph),
                           cache_len=retained_cache_len(graph), quantize=quantize,
                           quant_block_size=quant_block_size, quant_vocab=quant_vocab)  # fmt: skip
    return compile_artifact(graph, target, out_dir, opts, dry_run=dry_run, progress=progress)


def check_output_dir(out_dir: str | Path) -> Path:
    """The folder an artifact will be written to, absolute; refuses one that it would wrongly replace. The artifact
    replaces what is there whole, so that must be nothing, an empty folder or an artifact (it has a manifest):
    anything else (a file, a folder of the user's) is refused, not deleted."""
    out = Path(out_dir).expanduser().absolute()
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OptionError(f"{out_dir} is not a folder; give a new folder for the artifact (it is written whole)")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise OptionError(f"{out_dir} holds files and is not a qgraph artifact (no {MANIFEST}); give a new or empty folder "
                          "(an artifact replaces the folder it is written to)")  # fmt: skip
    if out == Path(out.anchor) or out == Path.home() or Path.cwd().is_relative_to(out):
        raise OptionError(f"{out_dir} holds the working folder or is the home or root folder; give a folder of its own")
    return out


def compile_artifact(
    source: str | Path | Graph, target: str, out_dir: str | Path, opts: Options, *, dry_run: bool = False, progress: Progress | None = None
) -> Path:
    """Compile ``source`` for ``target`` into ``out_dir`` with ``opts`` resolved for this model; returns the directory."""
    impl = get_target(target)
    impl.check_dry_run(dry_run)
    out_dir = check_output_dir(out_dir)
    start = time.perf_counter()
    graph = source if isinstance(source, Graph) else Graph.load(source)
    check_quantizable(graph, opts)
    facts = observe(graph)
    cache_len = retained_cache_len(graph)
    if cache_len is not None:
        opts.check_cache_len(cache_len)
    rewrite, specialize = compile_pipeline(impl, rewrite=KV_RETAINED not in facts, quantize=opts.weight_only)
    # Every pass of the compile, in order, before any runs (a specialization's pin width does not change the order).
    check_order([*rewrite, *specialize], replace(opts, seq_len=opts.prefill_seq_len), facts)
    reports: dict[str, Any] = {}
    if rewrite:
        _say(progress, f"optimizing ({graph.node_count()} nodes)")
        report = run_passes(graph, rewrite, opts, initial_facts=facts, require_retained=True)
        reports["optimize"] = report.to_dict()
        facts = set(report.facts)
    if not any(t.name.startswith("past_key.") for t in graph.inputs):
        raise CompileError("the graph has no past_key.{i} inputs; it does not follow the retained-state contract")
    io = io_contract(graph)
    out = Path(out_dir)
    with building(out) as tmp:
        base = tmp / "optimized.onnx"
        graph.save(base, external=True)
        specs = specializations(opts)
        chunked = False
        for spec in specs:
            _say(progress, f"pinning {spec.name} (batch {spec.batch_size}, seq_len {spec.seq_len}, ctx_len {spec.ctx_len})")
            g = Graph.load(base)
            report = run_passes(g, specialize, replace(opts, seq_len=spec.seq_len), initial_facts=facts)
            check_pinned(g, spec)
            reports[spec.name] = report.to_dict()
            chunked = chunked or PREFILL_CHUNKS_CONSECUTIVE in report.facts
            _say(progress, f"compiling {spec.name} for {target}")
            impl.compile_spec(g, tmp, spec, dict(opts.target_options), dry_run=dry_run, quantize=opts.quantize)
        extra = impl.finish(tmp, base, specs, dict(opts.target_options), dry_run=dry_run, progress=progress) or {}
        if not impl.keeps_base:
            remove_model_files(base)
        manifest = Manifest(
            qgraph_version=__version__,
            target=target,
            options=opts,
            specializations=specs,
            io=io,
            model=model_info(io),
            pass_reports=reports,
            fed_weights=extra.get("fed_weights", {}),
            prefill_positions="consecutive" if chunked else "any",
            dry_run=bool(extra.get("dry_run", False)),
        )
        manifest.hashes = hash_tree(tmp)
        (tmp / MANIFEST).write_text(manifest.to_json())
    _say(progress, f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return out


__all__ = ["CompileError", "compile_artifact", "compile_model", "io_contract", "retained_cache_len"]
