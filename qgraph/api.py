"""The high-level API, shaped like the seed's so its users feel at home.

```python
from qgraph import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("gpt2")   # hub id, local folder, "tiny-gpt2" or "tiny-llama"
model.compile(target="cpu", prefill_seq_len=32, ctx_len=128, batch_size=1)
out = model.generate(prompts=["Hi there!!"], tokenizer=tok, max_new_tokens=32)
```

Options left out take their defaults (:mod:`qgraph.pipeline.options`), resolved
once against the model's config: ``model.options(...)`` resolves and checks
them without doing anything slow, and ``compile(options=...)`` takes the result.

Exports and artifacts are cached under ``QGRAPH_HOME`` (default
``~/.cache/qgraph``). A cache key hashes the model's config and weights, the
pipeline, the options, qgraph's own code and the versions of the libraries that
export and compile (torch, transformers, onnx, onnxscript, onnx-graphsurgeon,
onnxruntime and onnxruntime-qnn where installed), so a changed weight, pass or
library never reuses a stale artifact. An entry is used only if its files match
the hashes recorded when it was built (:mod:`qgraph.artifact.verify`); a damaged
one is rebuilt with a warning. Using a complete entry writes nothing, so a
read-only cache works; building one holds a file lock on its key, so two
processes compiling the same model into the same cache do not collide.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qgraph.artifact.atomic import building
from qgraph.artifact.manifest import MANIFEST, ArtifactError, Manifest
from qgraph.artifact.verify import STAMP, hash_tree, read_small_file, verify_artifact, verify_files
from qgraph.errors import OptionError, QGraphError
from qgraph.frontend.export import DEFAULT_DTYPE, check_dtype
from qgraph.frontend.families import ModelSpec, spec_of
from qgraph.pipeline.options import DEFAULT_MAX_NEW_TOKENS, WEIGHT_ONLY_MODES, Options, check_at_least_one, check_prompts, check_token_ids

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: The distributions whose versions change what an export or a compile writes: every cache key holds them.
VERSIONED = ("torch", "transformers", "onnx", "onnxscript", "onnx-graphsurgeon", "onnxruntime", "onnxruntime-gpu", "onnxruntime-qnn")
#: A cached export's record of its files' hashes (an artifact's is its manifest).
EXPORT_RECORD = "export.json"


class CacheError(QGraphError):
    """The cache cannot hold what was asked for (a read-only cache without a complete entry)."""


def qgraph_home() -> Path:
    return Path(os.environ.get("QGRAPH_HOME") or Path.home() / ".cache" / "qgraph")


def code_digest() -> str:
    """A hash of qgraph's and the passes' source: a changed pass changes every key."""
    import passes

    h = hashlib.sha256()
    for root in (Path(__file__).parent, Path(passes.__file__).parent):
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def library_versions() -> dict[str, str]:
    """The installed version of each of :data:`VERSIONED` (those installed)."""
    from importlib import metadata

    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def check_cached_artifact(entry: Path, target: str, options: Options) -> None:
    """Raise :class:`ArtifactError` unless ``entry`` is a complete artifact of ``target`` compiled with
    ``options`` (those of its key) whose files match its manifest."""
    manifest = Manifest.load(entry)
    if (manifest.target, manifest.options) != (target, options):
        raise ArtifactError(f"{entry / MANIFEST} records target {manifest.target} with {manifest.options.to_dict()}, not those of "
                            f"its key ({target} with {options.to_dict()}); recompile the artifact")  # fmt: skip
    verify_artifact(entry, manifest)


def check_cached_export(entry: Path) -> None:
    """Raise :class:`ArtifactError` unless ``entry`` holds an export whose files match its record."""
    text = read_small_file(entry / EXPORT_RECORD)
    try:
        hashes = json.loads(text)["hashes"] if text is not None else None
        if not isinstance(hashes, dict):
            raise TypeError("no 'hashes' map")
    except (ValueError, TypeError, KeyError) as e:
        raise ArtifactError(f"{entry / EXPORT_RECORD} is missing or unreadable ({e}); the export must be made again") from None
    verify_files(entry, hashes, ["model.onnx"], record=EXPORT_RECORD, graphs=["model.onnx"])


def _damage(entry: Path, check: Callable[[Path], None]) -> str | None:
    """None if the cache entry is complete and verifies; "" if there is none; else what is wrong with it."""
    if not entry.exists():
        return ""
    try:
        check(entry)
    except QGraphError as e:
        return str(e)
    return None


@dataclass
class GenerateResult:
    tokens: list[list[int]]
    text: list[str] | None
    stats: Any
    finish_reasons: list[str]


class AutoModelForCausalLM:
    """A Hugging Face causal LM, exported, rewritten and compiled by qgraph."""

    def __init__(
        self, source: Any, *, dtype: str = DEFAULT_DTYPE, trust_remote_code: bool = False, progress: Progress | None = None
    ) -> None:
        check_dtype(dtype)
        self.source = source
        #: What the model is exported in (``qgraph.frontend.export.DTYPES``).
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.progress = progress
        self.onnx_path: Path | None = None
        self.artifact_dir: Path | None = None
        self._runtime: Any = None
        self._config: Any = None
        self._spec: ModelSpec | None = None
        self._digest: str | None = None
        #: The options of the last compile (None before one).
        self._options: Options | None = None

    @classmethod
    def from_pretrained(
        cls, model: str = "tiny-gpt2", *, dtype: str = DEFAULT_DTYPE, trust_remote_code: bool = False, progress: Progress | None = None
    ) -> AutoModelForCausalLM:
        """Name a model: a hub id, a local Hugging Face folder, or a bundled model (``tiny-gpt2``, ``tiny-llama``);
        ``dtype``: float32 or float16."""
        from qgraph.frontend.hf import resolve_model

        return cls(resolve_model(model), dtype=dtype, trust_remote_code=trust_remote_code, progress=progress)

    def _say(self, msg: str) -> None:
        log.info("%s", msg)
        if self.progress:
            self.progress(msg)

    @property
    def config(self) -> Any:
        if self._config is None:
            from qgraph.frontend.hf import load_config, load_generation_config

            self._config = load_config(self.source, trust_remote_code=self.trust_remote_code)
            self._spec = spec_of(self._config, str(self.source), load_generation_config(self.source))
        return self._config

    @property
    def spec(self) -> ModelSpec:
        """The model's shape (layers, heads, positions, vocabulary, EOS ids), read by its family module."""
        if self._spec is None:
            self.config  # noqa: B018 (reads it)
        return self._spec  # type: ignore[return-value]

    def _model_digest(self) -> str:
        # Hashing the weights reads them all; export and compile share one digest.
        if self._digest is None:
            self._digest = self._compute_digest()
        return self._digest

    def _compute_digest(self) -> str:
        folder = self.source.path
        if folder is None:  # a hub id: its snapshot folder in the Hugging Face cache
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(self.source.ref, local_files_only=True))
            except Exception:
                folder = None
        from qgraph.frontend.hf import weights_digest

        cfg = self.config.to_json_string(use_diff=False) if hasattr(self.config, "to_json_string") else str(self.config)
        return cache_key(cfg, weights_digest(folder) if folder else self.source.ref)

    def _cached(self, entry: Path, what: str, check: Callable[[Path], None], build: Callable[[], Any]) -> None:
        """Use the cache entry if it verifies (no lock, nothing written); else build it under its key's lock.

        A damaged entry is rebuilt with a warning; a cache that cannot be written fails in one line.
        """
        why = _damage(entry, check)
        if why is None:
            self._say(f"using the cached {what} {entry}")
            return
        lock = entry.with_suffix(".lock")
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a")
        except OSError as e:
            state = f"its {what} {entry.name} is damaged ({why})" if why else f"it holds no {what} {entry.name} for this model and options"
            raise CacheError(f"the qgraph cache (QGRAPH_HOME={qgraph_home()}) cannot be written ({e.strerror or e}) and {state}; "
                             "set QGRAPH_HOME to a writable folder") from None  # fmt: skip
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                why = _damage(entry, check)  # another process may have built it meanwhile
                if why is None:
                    self._say(f"using the cached {what} {entry}")
                    return
                if why:  # the advice to recompile is what happens next
                    log.warning("the cached %s %s is damaged (%s); rebuilding it", what, entry, why.rpartition("; ")[0] or why)
                build()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def export(self, *, exporter: str | None = None, opset: int | None = None, out: str | Path | None = None) -> Path:
        """Export the plain model to ONNX (cached); returns the file. ``exporter``: dynamo or torchscript (None: the
        model's, ``ModelSpec.exporter``)."""
        from qgraph.frontend.export import export_model

        exporter = exporter or self.spec.exporter
        if out is not None:
            self.onnx_path = export_model(self.source, out, exporter=exporter, opset=opset, dtype=self.dtype, progress=self.progress).path
            return self.onnx_path
        key = cache_key("export", self._model_digest(), exporter, opset, self.dtype, library_versions(), code_digest())
        entry = qgraph_home() / "exports" / key

        def build() -> None:
            # Built under a temporary name with the record of its hashes, then renamed: never half an entry.
            with building(entry) as tmp:
                export_model(self.source, tmp / "model.onnx", exporter=exporter, opset=opset, dtype=self.dtype, progress=self.progress)
                (tmp / EXPORT_RECORD).write_text(json.dumps({"hashes": hash_tree(tmp, skip=(EXPORT_RECORD, STAMP))}, indent=2))

        self._cached(entry, "export", check_cached_export, build)
        self.onnx_path = entry / "model.onnx"
        return self.onnx_path

    def options(
        self,
        target: str = "cpu",
        *,
        prefill_seq_len: int | None = None,
        ctx_len: int | None = None,
        batch_size: int | None = None,
        quantize: str | None = None,
        quant_block_size: int | None = None,
        quant_vocab: str | None = None,
        **target_options: Any,
    ) -> Options:
        """The compile options asked for (None: the default), resolved against this model and checked;
        nothing slow runs (the config is read, nothing is exported). ``quantize``: "int8" or "int4" (cpu,
        weight-only, ``quant_block_size`` weights per block, default 32; ``quant_vocab``: the vocabulary's
        mode, "int8", "int4" or "int4-rescore", default int8 under int8 and int4-rescore under int4), "w8a16" (qnn)."""
        from qgraph.targets import get_target

        impl = get_target(target)
        if quantize in WEIGHT_ONLY_MODES and self.dtype != "float32":  # before the export: the pass takes float32 weights
            raise OptionError(f"--quantize {quantize} quantizes float32 weights; drop --dtype {self.dtype} (the export is then float32)")
        calibration = target_options.get("calibration")
        if calibration is not None and (target, quantize) != ("qnn", "w8a16"):
            raise OptionError("calibration prompts are for --target qnn --quantize w8a16 (the other modes need none); drop them")
        if (target, quantize) == ("qnn", "w8a16"):
            target_options = {**target_options, "calibration": self._calibration_ids(calibration)}
        return Options.resolve(ctx_len=ctx_len, prefill_seq_len=prefill_seq_len, batch_size=batch_size, target_options=target_options,
                               target=impl, max_positions=self.spec.max_positions, max_positions_why=self.spec.max_positions_why(),
                               quantize=quantize,
                               quant_block_size=quant_block_size, quant_vocab=quant_vocab)  # fmt: skip

    def _calibration_ids(self, calibration: Sequence[Any] | None) -> list[list[int]]:
        """w8a16's calibration rows as token ids: text prompts (None: the built-in set) through the model's tokenizer."""
        from qgraph.targets.qnn_quant import CALIBRATION_PROMPTS

        rows = list(CALIBRATION_PROMPTS if calibration is None else calibration)
        if not rows or not all(isinstance(r, str) for r in rows):
            return rows  # token ids, or something the qnn target refuses in one line
        from qgraph.frontend.hf import load_tokenizer

        tokenizer = load_tokenizer(self.source, trust_remote_code=self.trust_remote_code)
        return check_token_ids([tokenizer(r)["input_ids"] for r in rows if r.strip()], self.spec.vocab_size)

    def compile(
        self,
        target: str = "cpu",
        *,
        prefill_seq_len: int | None = None,
        ctx_len: int | None = None,
        batch_size: int | None = None,
        artifacts: str | Path | None = None,
        dry_run: bool = False,
        options: Options | None = None,
        quantize: str | None = None,
        quant_block_size: int | None = None,
        quant_vocab: str | None = None,
        **target_options: Any,
    ) -> Path:
        """Optimize and compile for ``target`` (cached unless ``artifacts`` is given); returns the directory.

        ``quantize``: weight-only "int8" or "int4" on cpu (see :meth:`options`); part of the cache key.
        ``options``: already resolved by :meth:`options` (then give no numbers or target options here).
        """
        from qgraph.compile import check_output_dir, compile_artifact
        from qgraph.pipeline.registry import check_order
        from qgraph.pipeline.stages import compile_pipeline
        from qgraph.targets import get_target

        asked = {prefill_seq_len, ctx_len, batch_size, quantize, quant_block_size, quant_vocab}
        if options is not None and (target_options or asked != {None}):
            raise TypeError("compile() takes resolved options or the numbers and target options to resolve, not both")
        # Everything that can be checked before the (slow) export is: the options, and the order of every pass.
        opts = options or self.options(target, prefill_seq_len=prefill_seq_len, ctx_len=ctx_len, batch_size=batch_size,
                                       quantize=quantize, quant_block_size=quant_block_size, quant_vocab=quant_vocab,
                                       **target_options)  # fmt: skip
        if options is not None:  # made by hand, perhaps: the rules on its numbers against this model still hold
            options.validate(max_positions=self.spec.max_positions, max_positions_why=self.spec.max_positions_why())
        impl = get_target(target)
        impl.check_dry_run(dry_run)
        rewrite, specialize = compile_pipeline(impl, rewrite=True, quantize=opts.weight_only)
        check_order([*rewrite, *specialize], replace(opts, seq_len=opts.prefill_seq_len))
        if artifacts is not None:
            check_output_dir(artifacts)  # before the export
        onnx_path = self.onnx_path or self.export()
        if artifacts is not None:
            out = Path(artifacts)
            compile_artifact(onnx_path, target, out, opts, dry_run=dry_run, progress=self.progress)
        else:
            key = cache_key("compile", self._model_digest(), str(onnx_path), self.dtype, target, opts.to_dict(), dry_run, rewrite,
                            specialize, library_versions(), code_digest())  # fmt: skip
            out = qgraph_home() / "artifacts" / key
            self._cached(out, "artifact", lambda entry: check_cached_artifact(entry, target, opts),
                         lambda: compile_artifact(onnx_path, target, out, opts, dry_run=dry_run, progress=self.progress))  # fmt: skip
        self.artifact_dir = out
        self._options = opts
        self._runtime = None
        return out

    @property
    def runtime(self) -> Any:
        from qgraph.runtime import Runtime

        if self._runtime is None:
            if self.artifact_dir is None:
                self.compile()
            self._runtime = Runtime(self.artifact_dir)  # type: ignore[arg-type]
        return self._runtime

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        tokenizer: Any = None,
        *,
        input_ids: Sequence[Sequence[int]] | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        streamer: Callable[[int, int], None] | None = None,
        chat: bool = False,
        **sampling: Any,
    ) -> GenerateResult:
        """Generate from text ``prompts`` (with ``tokenizer``; a string is one prompt) or token ``input_ids``.

        ``chat``: each prompt is a user message put through the tokenizer's chat template
        (:func:`qgraph.frontend.hf.encode_prompts`); a tokenizer without one is refused.
        """
        from qgraph.runtime import GenerationError, Sampling

        if (prompts is None) == (input_ids is None):
            raise GenerationError("give either prompts (with a tokenizer) or input_ids")
        if chat and prompts is None:
            raise GenerationError("chat=True puts text prompts through the chat template; give prompts, not input_ids")
        check_at_least_one("max_new_tokens", max_new_tokens)
        Sampling(**sampling).check()
        if isinstance(prompts, str):
            prompts = [prompts]  # one prompt (a string is a sequence of one-letter prompts too)
        if prompts is not None:
            check_prompts(prompts, None)
            from qgraph.frontend.hf import encode_prompts, load_tokenizer

            if tokenizer is None:
                tokenizer = load_tokenizer(self.source, trust_remote_code=self.trust_remote_code)
            ids = encode_prompts(tokenizer, prompts, chat=chat)
        else:
            ids = list(input_ids)  # type: ignore[arg-type]
        if not ids:
            raise GenerationError("no prompts given")
        # Before the (slow) compile that generating may start: the options it compiles with, and the ids.
        opts = self._options or self.options()
        check_prompts(ids, opts.ctx_len)
        ids = check_token_ids(ids, self.spec.vocab_size)
        if self.artifact_dir is None:
            self.compile(options=opts)
        out = self.runtime.generate(
            ids, max_new_tokens=max_new_tokens, eos_token_id=self.spec.eos_token_ids, sampling=Sampling(**sampling), streamer=streamer
        )
        text = None
        if tokenizer is not None:
            from qgraph.frontend.hf import continuation_text

            text = [continuation_text(tokenizer, p, t) for p, t in zip(ids, out.tokens, strict=True)]
        return GenerateResult(out.tokens, text, out.stats, out.finish_reasons)
