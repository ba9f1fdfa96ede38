"""Hugging Face model sources: resolve a model name, load its config, weights, tokenizer.

A model is named in one of three ways:

* a bundled model (:data:`BUNDLED_MODELS`): ``tiny-gpt2``, a small GPT-2, or ``tiny-llama``, a small
  Llama (grouped KV heads), in ``qgraph/models/``;
* a local folder holding a Hugging Face model (it has a ``config.json``);
* a hub id (``gpt2``, ``org/name``), loaded with ``from_pretrained``; this works
  offline when the model is in the local Hugging Face cache. Where the hub
  cannot be reached, one request without retries tells, and the model is read
  from that cache at once (the libraries' own back-off took about 25 s to fail).

torch and transformers are imported inside the functions, so the core package
imports without them (they are the ``hf`` install extra). Nothing a model
folder holds is executed: remote code (a config's ``auto_map``) is never run
unless a caller passes ``trust_remote_code=True`` explicitly, and weights are
read from safetensors files only, never from pickle-based ``.bin`` files.

:func:`model_files` names exactly the files loading reads from a folder (as
transformers picks them), refusing weight files outside it; their headers are
checked (:mod:`qgraph.frontend.checkpoint`) before transformers opens them,
and :func:`weights_digest`, the model's part of a cache key, hashes just them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from qgraph.errors import GenerationError, MissingDependencyError, ModelSourceError
from qgraph.frontend.checkpoint import check_safetensors, confined, index_shards
from qgraph.frontend.families import family_of

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "models"
BUNDLED_MODELS = ("tiny-gpt2", "tiny-llama")
# A hub id is "name" or "owner/name" of letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_INSTALL_HINT = "install the export extra: pip install 'qgraph[hf]'"
_OFFLINE_HINT = (
    "to work offline, set HF_HUB_OFFLINE=1 (for models already in the Hugging Face cache), pass a local model folder "
    "(--model ./my-model), or use the bundled model (--model tiny-gpt2)"
)
GENERATION_CONFIG = "generation_config.json"
#: What loading reads from a folder besides the weights (the ones present).
CONFIG_FILES = ("config.json", GENERATION_CONFIG)
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

T = TypeVar("T")


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


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _hub_error(source: ModelSource, what: str, err: Exception) -> ModelSourceError:
    import huggingface_hub

    if source.kind == "hub" and huggingface_hub.is_offline_mode():
        hint = ("HF_HUB_OFFLINE is set, so only the Hugging Face cache is read: download the model once with the network "
                "(HF_HUB_OFFLINE unset), pass a local model folder (--model ./my-model), or use the bundled model (--model tiny-gpt2)")  # fmt: skip
    elif source.kind == "hub":
        hint = f"check the id and your network; {_OFFLINE_HINT}"
    else:
        hint = "check that the folder holds a complete save_pretrained() output"
    return ModelSourceError(f"could not load the {what} of '{source.ref}' ({_first_line(err)}); {hint}")


@functools.cache
def _unreachable_hub(ref: str) -> str | None:
    """Why the hub cannot be reached, from one request without retries; None if it answered (even "no such
    model") or the libraries are offline anyway. Asked once per process and model."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    if huggingface_hub.is_offline_mode():
        return None
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(ref, "config.json"), retry_on_errors=False)
    except HfHubHTTPError:
        return None  # an answer: from_pretrained says what it was
    except Exception as e:  # refused, no route, DNS, timeout, TLS: whatever the transport raises
        return _first_line(e)
    return None


@functools.cache
def _say_offline(ref: str, why: str) -> None:
    log.warning("cannot reach the Hugging Face hub (%s); using '%s' from the local cache", why, ref)


def _from_hub(src: ModelSource, what: str, load: Callable[..., T]) -> T:
    """``load()``; for a hub model whose hub cannot be reached, ``load(local_files_only=True)`` at once."""
    why = _unreachable_hub(src.ref) if src.kind == "hub" else None
    if why is None:
        return load()
    try:
        out = load(local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"cannot reach the Hugging Face hub ({why}) and the local cache has no {what} of '{src.ref}'; "
                               f"{_OFFLINE_HINT}") from e  # fmt: skip
    _say_offline(src.ref, why)  # once per model
    return out


def load_config(source: ModelSource | str, *, trust_remote_code: bool = False) -> Any:
    """The model's ``transformers`` config."""
    src = _as_source(source)
    _, transformers = require_hf()
    try:
        return _from_hub(
            src, "config", lambda **kw: transformers.AutoConfig.from_pretrained(src.ref, trust_remote_code=trust_remote_code, **kw)
        )
    except (OSError, ValueError) as e:
        raise _hub_error(src, "config", e) from e


def load_generation_config(source: ModelSource | str) -> Any | None:
    """The model's ``generation_config.json`` (a ``transformers.GenerationConfig``), or None where it has none.

    Where it exists, Hugging Face's generate takes its EOS ids from it, not from the config.
    """
    src = _as_source(source)
    _, transformers = require_hf()
    if src.path is not None and not (src.path / GENERATION_CONFIG).is_file():
        return None
    try:
        return _from_hub(src, "generation config", lambda **kw: transformers.GenerationConfig.from_pretrained(src.ref, **kw))
    except (OSError, ValueError, ModelSourceError) as e:
        if src.kind == "hub":
            return None  # a hub model without one (or a cache without it)
        raise ModelSourceError(f"{src.path / GENERATION_CONFIG} cannot be read ({_first_line(e)}); fix it or delete it") from e


def check_supported(config: Any, name: str = "the model") -> None:
    """Raise :class:`ModelSourceError` unless a family module knows ``config``'s architecture."""
    family_of(config, name)


def weight_files(folder: Path) -> list[Path]:
    """The weight files loading reads from ``folder``, as transformers picks them (an index first, then its shards).

    A config's ``transformers_weights`` names the file, else ``model.safetensors``,
    else ``model.safetensors.index.json`` and the shards it lists. A name that is
    absolute or climbs out with ``..`` raises :class:`ModelSourceError`.
    """
    explicit = None
    try:
        explicit = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        pass  # no readable config: loading the config says so
    if explicit is not None:
        first = confined(folder, explicit, "config.json's transformers_weights")
        if not first.name.endswith((".safetensors", ".safetensors.index.json")) or not first.is_file():
            raise ModelSourceError(f"config.json's transformers_weights names '{explicit}', which is not a safetensors file in {folder}")
    elif (folder / SAFE_WEIGHTS).is_file():
        first = folder / SAFE_WEIGHTS
    elif (folder / SAFE_INDEX).is_file():
        first = folder / SAFE_INDEX
    else:
        return []
    return [first, *index_shards(first)] if first.name.endswith(".index.json") else [first]


def model_files(folder: Path) -> list[Path]:
    """Exactly the files loading a model from ``folder`` reads: its configs and :func:`weight_files`."""
    return [folder / n for n in CONFIG_FILES if (folder / n).is_file()] + weight_files(folder)


def check_model_files(folder: Path) -> None:
    """Refuse, in one line, weight files that are outside ``folder`` or malformed; reads only their headers."""
    for p in weight_files(folder):
        if p.name.endswith(".safetensors"):
            check_safetensors(p)


def weights_digest(folder: Path) -> str:
    """A hash of the files loading reads from ``folder`` (:func:`model_files`): names, then content."""
    h = hashlib.sha256()
    for p in model_files(folder):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _cached_snapshot(ref: str) -> Path | None:
    """A hub model's folder in the local Hugging Face cache, or None (never touches the network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # not cached, or no huggingface_hub: transformers reports it
        return None


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
    folder = src.path or _cached_snapshot(src.ref)
    if folder is not None:
        check_model_files(folder)  # before transformers reads them: it answers a lying header with a traceback

    def load(**kw: Any) -> Any:
        # safetensors only: a pickle (.bin) can run code when it is loaded.
        return transformers.AutoModelForCausalLM.from_pretrained(
            src.ref, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kw
        )

    try:
        model = _from_hub(src, "weights", load)
    except (OSError, ValueError) as e:
        if "safetensors" in str(e):
            raise ModelSourceError(
                f"'{src.ref}' has no safetensors weights (model.safetensors); qgraph does not load pickle-based weights "
                "(pytorch_model.bin), which can run code when loaded: convert them with save_pretrained() in a trusted environment"
            ) from e
        raise _hub_error(src, "weights", e) from e
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        # A hub model downloaded just now, so not checked above.
        raise ModelSourceError(f"a safetensors file of '{src.ref}' is malformed ({e}); download the model again") from None
    return model.eval()


#: Files one of which a local tokenizer is read from (fast, byte-level BPE, SentencePiece, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt")


def load_tokenizer(source: ModelSource | str, *, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, or :class:`ModelSourceError` where the model has none."""
    src = _as_source(source)
    _, transformers = require_hf()

    def load(**kw: Any) -> Any:
        return transformers.AutoTokenizer.from_pretrained(src.ref, trust_remote_code=trust_remote_code, **kw)

    none = ModelSourceError(
        f"'{src.ref}' has no tokenizer (no tokenizer.json, or vocab.json and merges.txt); copy the model's tokenizer files "
        "there (tokenizer.save_pretrained(folder)) or give token ids instead (--input-ids 15496,612; input_ids= in the API)"
    )
    if src.path is not None and not any((src.path / f).is_file() for f in TOKENIZER_FILES):
        raise none  # transformers 5 says it cannot instantiate "the backend tokenizer from one of: " (nothing)
    try:
        tokenizer = _from_hub(src, "tokenizer", load)
    except (OSError, ValueError) as e:
        raise _hub_error(src, "tokenizer", e) from e
    # Without tokenizer files transformers builds the config's tokenizer class from nothing: no vocabulary but its
    # special tokens, so every text would become no ids at all.
    if len(tokenizer.get_vocab()) <= len(getattr(tokenizer, "added_tokens_encoder", {})):
        raise none
    return tokenizer


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, chat: bool = False) -> list[list[int]]:
    """The token ids of text ``prompts``; with ``chat``, each prompt is one user message put through the
    tokenizer's chat template, ending with the prompt of the assistant's turn (Hugging Face's
    ``apply_chat_template(..., add_generation_prompt=True)``)."""
    if not chat:
        return [list(tokenizer(p)["input_ids"]) for p in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError(
            f"the tokenizer of '{tokenizer.name_or_path}' has no chat template (no chat_template in its tokenizer_config.json "
            "or chat_template.jinja); give the prompt as plain text (without --chat, chat=False)"
        )
    rows = []
    for p in prompts:
        try:
            rows.append(list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                           return_dict=True)["input_ids"]))  # fmt: skip
        except Exception as e:  # the template's own error (jinja2's TemplateError: a syntax error, its raise_exception)
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise GenerationError(f"the chat template of '{tokenizer.name_or_path}' failed on a single user message ({why}); "
                                  "give the prompt as plain text (without --chat, chat=False)") from e  # fmt: skip
    return rows


#: Prompt tokens a continuation is decoded after (:func:`continuation_text`).
CONTEXT_TOKENS = 4


def continuation_text(tokenizer: Any, prompt: Sequence[int], tokens: Sequence[int]) -> str:
    """The text that ``tokens`` add after ``prompt`` (ids), as decoding them all would give it. Decoded alone,
    SentencePiece (Metaspace) and word-level tokenizers drop the first word's leading space ("▁world" alone is
    "world": prompt and continuation ran together); so they are decoded after the prompt's last few tokens, whose
    own text is cut off."""
    context = list(prompt[-CONTEXT_TOKENS:])
    head = tokenizer.decode(context, skip_special_tokens=True)
    full = tokenizer.decode(context + list(tokens), skip_special_tokens=True)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode(list(tokens), skip_special_tokens=True)


class TextStream:
    """Prints one row's continuation as its tokens come (a ``streamer`` for ``generate``): what each token adds to
    :func:`continuation_text`, holding back a character whose bytes span tokens (printed once whole, never as
    "\ufffd"); ``strip``: without the leading whitespace (a chat reply on a line of its own). :meth:`finish` prints
    what is left."""

    def __init__(self, tokenizer: Any, prompt: Sequence[int], write: Callable[[str], Any], *, strip: bool = False) -> None:
        self.tokenizer, self.prompt, self.write, self.strip = tokenizer, list(prompt), write, strip
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self._text()
        if not text.endswith("\ufffd"):
            self._emit(text)

    def finish(self) -> None:
        self._emit(self._text())

    def _text(self) -> str:
        text = continuation_text(self.tokenizer, self.prompt, self.tokens)
        return text.lstrip() if self.strip else text

    def _emit(self, text: str) -> None:
        self.write(text[self.printed :])
        self.printed = len(text)
