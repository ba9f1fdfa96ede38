"""Hugging Face model sources: resolve a model name, load its config, weights, tokenizer.

A model is named in one of three ways:

* ``tiny-gpt2``: the small GPT-2 bundled with qgraph (``qgraph/models/tiny-gpt2``);
* a local folder holding a Hugging Face model (it has a ``config.json``);
* a hub id (``gpt2``, ``org/name``), loaded with ``from_pretrained``; this works
  offline when the model is in the local Hugging Face cache.

torch and transformers are imported inside the functions, so the core package
imports without them (they are the ``hf`` install extra). Nothing a model
folder holds is executed: remote code (a config's ``auto_map``) is never run
unless a caller passes ``trust_remote_code=True`` explicitly, and weights are
read from safetensors files only, never from pickle-based ``.bin`` files.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qgraph.errors import MissingDependencyError, ModelSourceError
from qgraph.frontend.families import family_of

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "models"
BUNDLED_MODELS = ("tiny-gpt2",)
# A hub id is "name" or "owner/name" of letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_INSTALL_HINT = "install the export extra: pip install 'qgraph[hf]'"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``ref`` is what ``from_pretrained`` is given."""

    kind: Literal["bundled", "local", "hub"]
    ref: str

    @property
    def path(self) -> Path | None:
        """The model's folder, for bundled and local models."""
        return Path(self.ref) if self.kind != "hub" else None

    def __str__(self) -> str:
        return f"{self.ref} ({self.kind})"


def require_hf() -> tuple[Any, Any]:
    """Import and return ``(torch, transformers)``, or explain how to install them."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise MissingDependencyError(
            f"loading Hugging Face models needs torch and transformers ({e.name} is missing); {_INSTALL_HINT}"
        ) from None
    return torch, transformers


def resolve_model(model: str) -> ModelSource:
    """Turn a model name (bundled name, local folder or hub id) into a :class:`ModelSource`.

    Nothing is downloaded here; a hub id is only checked for its form.
    """
    if model in BUNDLED_MODELS:
        folder = BUNDLED_DIR / model
        if not (folder / "config.json").is_file():
            raise ModelSourceError(f"the bundled model '{model}' is missing from {folder}; reinstall qgraph or pass a model folder")
        return ModelSource("bundled", str(folder))
    path = Path(model).expanduser()
    looks_local = path.is_absolute() or model.startswith((".", "~")) or path.exists()
    if looks_local:
        if not path.is_dir():
            raise ModelSourceError(f"no model folder at {path}; pass an existing folder, a hub id, or one of {', '.join(BUNDLED_MODELS)}")
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{path} has no config.json, so it is not a Hugging Face model folder; save the model with save_pretrained()"
            )
        return ModelSource("local", str(path.resolve()))
    if not _HUB_ID.match(model):
        raise ModelSourceError(f"'{model}' is neither a folder nor a Hugging Face hub id (like 'gpt2' or 'owner/name')")
    return ModelSource("hub", model)


def _as_source(source: ModelSource | str) -> ModelSource:
    return source if isinstance(source, ModelSource) else resolve_model(source)


def _hub_error(source: ModelSource, what: str, err: Exception) -> ModelSourceError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if source.kind == "hub":
        hint = "check the id and your network (HF_HUB_OFFLINE=1 skips the network), or pass a local model folder"
    else:
        hint = "check that the folder holds a complete save_pretrained() output"
    return ModelSourceError(f"could not load the {what} of '{source.ref}' ({first}); {hint}")


def load_config(source: ModelSource | str, *, trust_remote_code: bool = False) -> Any:
    """The model's ``transformers`` config."""
    src = _as_source(source)
    _, transformers = require_hf()
    try:
        return transformers.AutoConfig.from_pretrained(src.ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(src, "config", e) from e


def check_supported(config: Any, name: str = "the model") -> None:
    """Raise :class:`ModelSourceError` unless a family module knows ``config``'s architecture."""
    family_of(config, name)


def load_model(
    source: ModelSource | str,
    dtype: str | torch.dtype = "float32",
    *,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a supported causal LM in eval mode with weights of ``dtype``."""
    src = _as_source(source)
    torch, transformers = require_hf()
    check_supported(load_config(src, trust_remote_code=trust_remote_code), f"'{src.ref}'")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise ModelSourceError(f"'{dtype}' is not a torch dtype; use e.g. 'float32' or 'float16'")
    log.info("loading %s as %s", src, torch_dtype)
    try:
        # safetensors only: a pickle (.bin) can run code when it is loaded.
        model = transformers.AutoModelForCausalLM.from_pretrained(
            src.ref, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        if "safetensors" in str(e):
            raise ModelSourceError(
                f"'{src.ref}' has no safetensors weights (model.safetensors); qgraph does not load pickle-based weights "
                "(pytorch_model.bin), which can run code when loaded: convert them with save_pretrained() in a trusted environment"
            ) from e
        raise _hub_error(src, "weights", e) from e
    return model.eval()


def load_tokenizer(source: ModelSource | str, *, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer."""
    src = _as_source(source)
    _, transformers = require_hf()
    try:
        return transformers.AutoTokenizer.from_pretrained(src.ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(src, "tokenizer", e) from e
