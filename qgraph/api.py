"""The high-level API, shaped like the seed's so its users feel at home.

```python
from qgraph import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("gpt2")   # hub id, local folder, or "tiny-gpt2"
model.compile(target="cpu", prefill_seq_len=32, ctx_len=128, batch_size=1)
out = model.generate(prompts=["Hi there!!"], tokenizer=tok, max_new_tokens=32)
```

Options left out take their defaults (:mod:`qgraph.pipeline.options`), resolved
once against the model's config: ``model.options(...)`` resolves and checks
them without doing anything slow, and ``compile(options=...)`` takes the result.

Exports and artifacts are cached under ``QGRAPH_HOME`` (default
``~/.cache/qgraph``). A cache key hashes the model's config and weights, the
pipeline, the options and qgraph's own code, so a changed weight or a changed
pass never reuses a stale artifact. Work on one key holds a file lock, so two
processes compiling the same model into the same cache do not collide.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qgraph.frontend.export import DEFAULT_DTYPE, check_dtype
from qgraph.frontend.families import ModelSpec, spec_of
from qgraph.pipeline.options import DEFAULT_MAX_NEW_TOKENS, Options, check_at_least_one, check_prompts, check_token_ids

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


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


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (a lock file) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
        """Name a model: a hub id, a local Hugging Face folder, or ``tiny-gpt2``; ``dtype``: float32 or float16."""
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

    def export(self, *, exporter: str = "dynamo", opset: int | None = None, out: str | Path | None = None) -> Path:
        """Export the plain model to ONNX (cached); returns the file."""
        from qgraph.frontend.export import export_model

        if out is not None:
            self.onnx_path = export_model(self.source, out, exporter=exporter, opset=opset, dtype=self.dtype, progress=self.progress).path
            return self.onnx_path
        key = cache_key("export", self._model_digest(), exporter, opset, self.dtype, code_digest())
        path = qgraph_home() / "exports" / key / "model.onnx"
        with locked(path.parent.with_suffix(".lock")):
            if not path.is_file():
                export_model(self.source, path, exporter=exporter, opset=opset, dtype=self.dtype, progress=self.progress)
            else:
                self._say(f"using the cached export {path}")
        self.onnx_path = path
        return path

    def options(
        self,
        target: str = "cpu",
        *,
        prefill_seq_len: int | None = None,
        ctx_len: int | None = None,
        batch_size: int | None = None,
        **target_options: Any,
    ) -> Options:
        """The compile options asked for (None: the default), resolved against this model and checked;
        nothing slow runs (the config is read, nothing is exported)."""
        from qgraph.targets import get_target

        impl = get_target(target)
        return Options.resolve(ctx_len=ctx_len, prefill_seq_len=prefill_seq_len, batch_size=batch_size, target_options=target_options,
                               target=impl, max_positions=self.spec.max_positions)  # fmt: skip

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
        **target_options: Any,
    ) -> Path:
        """Optimize and compile for ``target`` (cached unless ``artifacts`` is given); returns the directory.

        ``options``: already resolved by :meth:`options` (then give no numbers or target options here).
        """
        from qgraph.compile import compile_artifact
        from qgraph.pipeline.registry import check_order
        from qgraph.pipeline.stages import compile_pipeline
        from qgraph.targets import get_target

        if options is not None and (target_options or {prefill_seq_len, ctx_len, batch_size} != {None}):
            raise TypeError("compile() takes resolved options or the numbers and target options to resolve, not both")
        # Everything that can be checked before the (slow) export is: the options, and the order of every pass.
        opts = options or self.options(target, prefill_seq_len=prefill_seq_len, ctx_len=ctx_len, batch_size=batch_size, **target_options)
        rewrite, specialize = compile_pipeline(get_target(target), rewrite=True)
        check_order([*rewrite, *specialize], replace(opts, seq_len=opts.prefill_seq_len))
        onnx_path = self.onnx_path or self.export()
        if artifacts is not None:
            out = Path(artifacts)
            compile_artifact(onnx_path, target, out, opts, dry_run=dry_run, progress=self.progress)
        else:
            key = cache_key("compile", self._model_digest(), str(onnx_path), self.dtype, target, opts.to_dict(), dry_run, rewrite,
                            specialize, code_digest())  # fmt: skip
            out = qgraph_home() / "artifacts" / key
            with locked(out.with_suffix(".lock")):
                if (out / "manifest.json").is_file():
                    self._say(f"using the cached artifact {out}")
                else:
                    compile_artifact(onnx_path, target, out, opts, dry_run=dry_run, progress=self.progress)
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
        prompts: Sequence[str] | None = None,
        tokenizer: Any = None,
        *,
        input_ids: Sequence[Sequence[int]] | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        streamer: Callable[[int, int], None] | None = None,
        **sampling: Any,
    ) -> GenerateResult:
        """Generate from text ``prompts`` (with ``tokenizer``) or token ``input_ids``."""
        from qgraph.runtime import GenerationError, Sampling

        if (prompts is None) == (input_ids is None):
            raise GenerationError("give either prompts (with a tokenizer) or input_ids")
        check_at_least_one("max_new_tokens", max_new_tokens)
        Sampling(**sampling).check()
        if prompts is not None:
            check_prompts(prompts, None)
            if tokenizer is None:
                from qgraph.frontend.hf import load_tokenizer

                tokenizer = load_tokenizer(self.source, trust_remote_code=self.trust_remote_code)
            ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
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
        text = [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens] if tokenizer is not None else None
        return GenerateResult(out.tokens, text, out.stats, out.finish_reasons)
