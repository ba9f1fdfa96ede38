"""The high-level API, shaped like the seed's so its users feel at home.

```python
from qgraph import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("gpt2")   # hub id, local folder, or "tiny-gpt2"
model.compile(target="cpu", prefill_seq_len=32, ctx_len=128, batch_size=1)
out = model.generate(prompts=["Hi there!!"], tokenizer=tok, max_new_tokens=32)
```

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgraph.errors import QGraphError
from qgraph.frontend.families import ModelSpec, spec_of

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


def weights_digest(folder: Path) -> str:
    """A hash of a model folder's config and weight files (size, then content)."""
    h = hashlib.sha256()
    names = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin") and p.is_file())
    for p in names:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def check_generate_options(*, max_new_tokens: int | None = None, prefill_seq_len: int | None = None, ctx_len: int | None = None,
                           batch_size: int | None = None) -> None:  # fmt: skip
    """Raise :class:`GenerationError` for numbers that cannot work, before anything slow runs."""
    from qgraph.runtime import GenerationError

    for what, flag, value in (("max_new_tokens", "--max-new-tokens", max_new_tokens), ("the prefill length", "--prefill-seq-len", prefill_seq_len),
                              ("ctx_len", "--ctx-len", ctx_len), ("the batch size", "--batch-size", batch_size)):  # fmt: skip
        if value is not None and value < 1:
            raise GenerationError(f"{what} must be at least 1, got {value}; pass {flag} 1 or more")
    if prefill_seq_len is not None and ctx_len is not None and prefill_seq_len > ctx_len:
        raise GenerationError(f"the prefill length {prefill_seq_len} is larger than ctx_len {ctx_len}; use a prefill length <= {ctx_len}")


def check_prompts(prompts: Sequence[Sequence[int]], ctx_len: int) -> None:
    """Raise :class:`GenerationError` for an empty prompt or one that leaves no room in ``ctx_len``."""
    from qgraph.runtime import GenerationError

    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty; give some text (or token ids) to continue")
        if len(p) >= ctx_len:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens, which leaves no room to generate in ctx_len {ctx_len}; "
                f"shorten it or compile with ctx_len {len(p) + 1} or more"
            )


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

    def __init__(self, source: Any, *, trust_remote_code: bool = False, progress: Progress | None = None) -> None:
        self.source = source
        self.trust_remote_code = trust_remote_code
        self.progress = progress
        self.onnx_path: Path | None = None
        self.artifact_dir: Path | None = None
        self._runtime: Any = None
        self._config: Any = None
        self._spec: ModelSpec | None = None
        self._digest: str | None = None
        self._ctx_len: int | None = None

    @classmethod
    def from_pretrained(
        cls, model: str = "tiny-gpt2", *, trust_remote_code: bool = False, progress: Progress | None = None
    ) -> AutoModelForCausalLM:
        """Name a model: a hub id, a local Hugging Face folder, or ``tiny-gpt2``."""
        from qgraph.frontend.hf import resolve_model

        return cls(resolve_model(model), trust_remote_code=trust_remote_code, progress=progress)

    def _say(self, msg: str) -> None:
        log.info("%s", msg)
        if self.progress:
            self.progress(msg)

    @property
    def config(self) -> Any:
        if self._config is None:
            from qgraph.frontend.hf import load_config

            self._config = load_config(self.source, trust_remote_code=self.trust_remote_code)
            self._spec = spec_of(self._config, str(self.source))
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
        cfg = self.config.to_json_string(use_diff=False) if hasattr(self.config, "to_json_string") else str(self.config)
        return cache_key(cfg, weights_digest(folder) if folder else self.source.ref)

    def export(self, *, exporter: str = "dynamo", opset: int | None = None, out: str | Path | None = None) -> Path:
        """Export the plain model to ONNX (cached); returns the file."""
        from qgraph.frontend.export import export_model

        if out is not None:
            self.onnx_path = export_model(self.source, out, exporter=exporter, opset=opset, progress=self.progress).path
            return self.onnx_path
        key = cache_key("export", self._model_digest(), exporter, opset, code_digest())
        path = qgraph_home() / "exports" / key / "model.onnx"
        with locked(path.parent.with_suffix(".lock")):
            if not path.is_file():
                export_model(self.source, path, exporter=exporter, opset=opset, progress=self.progress)
            else:
                self._say(f"using the cached export {path}")
        self.onnx_path = path
        return path

    def compile(
        self,
        target: str = "cpu",
        *,
        prefill_seq_len: int = 32,
        ctx_len: int = 128,
        batch_size: int = 1,
        artifacts: str | Path | None = None,
        dry_run: bool = False,
        **target_options: Any,
    ) -> Path:
        """Optimize and compile for ``target`` (cached unless ``artifacts`` is given); returns the directory."""
        from qgraph.compile import compile_model
        from qgraph.pipeline.optimize import DEFAULT_PIPELINE
        from qgraph.targets import get_target

        # Everything that can be checked before the (slow) export is.
        check_generate_options(prefill_seq_len=prefill_seq_len, ctx_len=ctx_len, batch_size=batch_size)
        get_target(target).check_options(dict(target_options))
        n_pos = self.spec.max_positions
        if ctx_len > n_pos:
            raise QGraphError(f"ctx_len {ctx_len} is larger than the model's maximum length {n_pos}; use --ctx-len {n_pos} or less")
        if prefill_seq_len > ctx_len:
            raise QGraphError(f"the prefill length {prefill_seq_len} is larger than ctx_len {ctx_len}; use a prefill length <= {ctx_len}")
        onnx_path = self.onnx_path or self.export()
        opts = dict(target_options)
        args = dict(prefill_seq_len=prefill_seq_len, ctx_len=ctx_len, batch_size=batch_size, options=opts, dry_run=dry_run)
        if artifacts is not None:
            out = Path(artifacts)
            compile_model(onnx_path, target, out, progress=self.progress, **args)  # type: ignore[arg-type]
        else:
            key = cache_key("compile", self._model_digest(), str(onnx_path), target, args, DEFAULT_PIPELINE, code_digest())
            out = qgraph_home() / "artifacts" / key
            with locked(out.with_suffix(".lock")):
                if (out / "manifest.json").is_file():
                    self._say(f"using the cached artifact {out}")
                else:
                    compile_model(onnx_path, target, out, progress=self.progress, **args)  # type: ignore[arg-type]
        self.artifact_dir = out
        self._ctx_len = ctx_len
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
        max_new_tokens: int = 32,
        streamer: Callable[[int, int], None] | None = None,
        **sampling: Any,
    ) -> GenerateResult:
        """Generate from text ``prompts`` (with ``tokenizer``) or token ``input_ids``."""
        from qgraph.runtime import GenerationError, Sampling

        if (prompts is None) == (input_ids is None):
            raise GenerationError("give either prompts (with a tokenizer) or input_ids")
        check_generate_options(max_new_tokens=max_new_tokens)
        if prompts is not None:
            if any(not p for p in prompts):
                raise GenerationError("a prompt is empty; give some text to continue")
            if tokenizer is None:
                from qgraph.frontend.hf import load_tokenizer

                tokenizer = load_tokenizer(self.source, trust_remote_code=self.trust_remote_code)
            ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
        else:
            ids = [list(map(int, row)) for row in input_ids]  # type: ignore[union-attr]
        if not ids:
            raise GenerationError("no prompts given")
        check_prompts(ids, self._ctx_len or 128)
        out = self.runtime.generate(
            ids, max_new_tokens=max_new_tokens, eos_token_id=self.spec.eos_token_ids, sampling=Sampling(**sampling), streamer=streamer
        )
        text = [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens] if tokenizer is not None else None
        return GenerateResult(out.tokens, text, out.stats, out.finish_reasons)
