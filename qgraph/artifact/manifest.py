"""The artifact directory's manifest: what a compile wrote, and how to read it back.

``manifest.json`` (format 2) holds each value once: the qgraph version, the
target, the resolved ``options`` (ctx_len, prefill_seq_len, batch_size, the
target's options), the specializations with their files (their shapes follow
from the options: prefill takes prefill_seq_len tokens, decode one), the IO
contract, the model's shape in :class:`~qgraph.frontend.families.ModelSpec`'s
names, the pass reports, content hashes, the weights the runtime binds
(``fed_weights``) and ``prefill_positions`` (see :mod:`qgraph.compile`).

Format 1 (qgraph before format 2) recorded batch_size and ctx_len at the top,
again in every specialization and in ``model``, and named the model's shape
after GPT-2's config; it is converted on load, so artifacts compiled before
still open.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qgraph.errors import QGraphError
from qgraph.ir.paths import Escape, EscapeError, inside
from qgraph.pipeline.options import Options

MANIFEST = "manifest.json"
WEIGHTS = "weights.data"
#: The format this qgraph writes.
FORMAT_VERSION = 2
#: The options format 1 kept at its top level (format 2 keeps them in ``options``).
_FORMAT_1_OPTIONS = ("ctx_len", "prefill_seq_len", "batch_size", "target_options")


class ArtifactError(QGraphError):
    """An artifact directory is missing, incomplete or not one this qgraph reads."""


@dataclass
class Specialization:
    """One compiled graph of an artifact: its shape and, once compiled, its files."""

    name: str
    batch_size: int
    seq_len: int
    ctx_len: int
    file: str = ""
    extra_files: list[str] = field(default_factory=list)


def specializations(opts: Options) -> list[Specialization]:
    """The specializations a compile pins: a prompt chunk (prefill_seq_len tokens), then one token (decode)."""
    return [
        Specialization(name, opts.batch_size, seq_len, opts.ctx_len) for name, seq_len in (("prefill", opts.prefill_seq_len), ("decode", 1))
    ]


def model_info(io: Mapping[str, Any]) -> dict[str, Any]:
    """Layers, KV heads, head size, vocabulary and dtype (ModelSpec's names), read off an IO contract (``Manifest.io``)."""
    kv = [d for d in io["inputs"] if d["name"].startswith("past_key.")]
    if not kv or len(kv[0]["shape"]) != 4:
        raise ArtifactError("the IO contract has no [batch, heads, ctx_len, head_dim] past_key.{i} inputs")
    logits = next((d for d in io["outputs"] if d["name"] == "logits"), None)
    shape = kv[0]["shape"]
    return {
        "num_layers": len(kv),
        "num_kv_heads": shape[1],
        "head_dim": shape[3],
        "vocab_size": logits["shape"][-1] if logits is not None and logits["shape"] else None,
        "dtype": kv[0]["dtype"] or "float32",
    }


@dataclass
class Manifest:
    """What ``manifest.json`` holds (see the module docstring)."""

    qgraph_version: str
    target: str
    options: Options
    specializations: list[Specialization]
    io: dict[str, Any]
    model: dict[str, Any]
    pass_reports: dict[str, Any]
    hashes: dict[str, str] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    #: weights the runtime binds as inputs (cpu: large MatMul weights): name -> file, offset, length, shape, dtype.
    fed_weights: dict[str, Any] = field(default_factory=dict)
    #: "consecutive" if the prefill graph takes the runtime's chunks only (see the module docstring), else "any".
    prefill_positions: str = "any"
    #: The target wrote its compiler's inputs only (qaic --dry-run): there is nothing to run.
    dry_run: bool = False

    def spec(self, name: str) -> Specialization:
        for s in self.specializations:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "qgraph_version": self.qgraph_version,
            "target": self.target,
            "options": self.options.to_dict(),
            "specializations": [{"name": s.name, "file": s.file, "extra_files": list(s.extra_files)} for s in self.specializations],
            "io": self.io,
            "model": self.model,
            "pass_reports": self.pass_reports,
            "hashes": self.hashes,
            "fed_weights": self.fed_weights,
            "prefill_positions": self.prefill_positions,
            "dry_run": self.dry_run,
        }

    def named_files(self) -> Iterator[tuple[str, str]]:
        """(what names it, file) for every file the manifest names, hashes aside."""
        for s in self.specializations:
            yield f"the {s.name} specialization's file", s.file
            for extra in s.extra_files:
                yield f"an extra file of the {s.name} specialization", extra
        for name, w in self.fed_weights.items():
            yield f"fed weight '{name}'", str(w["file"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """A manifest of format 2, or of format 1 converted."""
        if data.get("format") == 1:
            data = from_format_1(data)
        options = Options.from_dict(data["options"])
        shapes = {s.name: s for s in specializations(options)}
        specs = []
        for entry in data["specializations"]:
            spec = shapes.pop(entry["name"])  # each specialization once
            spec.file, spec.extra_files = str(entry["file"]), list(entry.get("extra_files", []))
            specs.append(spec)
        if shapes:
            raise ValueError(f"no {' or '.join(shapes)} specialization")
        return cls(qgraph_version=data["qgraph_version"], target=data["target"], options=options, specializations=specs,
                   io=data["io"], model=data["model"], pass_reports=data["pass_reports"], hashes=data.get("hashes", {}),
                   format=data["format"], fed_weights=data.get("fed_weights", {}),
                   prefill_positions=data.get("prefill_positions", "any"), dry_run=data.get("dry_run", False) is True)  # fmt: skip

    @classmethod
    def load(cls, artifact_dir: str | Path) -> Manifest:
        path = Path(artifact_dir) / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"{artifact_dir} is not a qgraph artifact directory (no {MANIFEST}); run qgraph compile first")
        try:
            data = json.loads(path.read_text())
            if data.get("format") not in (1, FORMAT_VERSION):
                raise ArtifactError(
                    f"{path} has format {data.get('format')}, this qgraph reads {FORMAT_VERSION} (and converts 1); recompile the artifact"
                )
            manifest = cls.from_dict(data)
            if not isinstance(manifest.hashes, dict) or not all(isinstance(v, str) for v in manifest.hashes.values()):
                raise ValueError("'hashes' is not a map of file names to digests")
            for what, name in [*manifest.named_files(), *(("a hashed file", h) for h in manifest.hashes)]:
                confined(Path(artifact_dir), name, what)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ArtifactError(f"{path} is not a valid manifest ({type(e).__name__}: {e}); recompile the artifact") from None
        return manifest


def from_format_1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A format-1 manifest in format 2's layout: the options gathered into ``options``, the specializations'
    copies of them dropped, and the model info read again off the IO contract under ModelSpec's names."""
    out = {k: v for k, v in data.items() if k not in _FORMAT_1_OPTIONS}
    out["format"] = FORMAT_VERSION
    out["options"] = {k: data[k] for k in _FORMAT_1_OPTIONS}
    out["specializations"] = [
        {"name": s["name"], "file": s["file"], "extra_files": s.get("extra_files", [])} for s in data["specializations"]
    ]
    out["model"] = model_info(data["io"])
    return out


def confined(folder: Path, name: str, what: str) -> Path:
    """``folder/name``, refused unless it stays inside ``folder``: a relative path without ``..`` that no
    symlink leads out of (it need not exist)."""
    try:
        inside(folder, name)
    except EscapeError as e:
        where = f"{folder / MANIFEST}: {what} '{name}'"
        raise ArtifactError(f"{where} {_ESCAPES[e.kind].format(detail=e.detail)}") from None
    return folder / name


_ESCAPES = {
    Escape.NOT_A_NAME: "is not a usable file name; recompile the artifact",
    Escape.ABSOLUTE: "is outside the artifact directory; an artifact's files stay in its folder (recompile it)",
    Escape.DOTDOT: "is outside the artifact directory; an artifact's files stay in its folder (recompile it)",
    Escape.UNRESOLVABLE: "cannot be resolved ({detail}); recompile the artifact",
    Escape.LINKS_OUT: "leads outside the artifact directory (to {detail}); an artifact's files stay in its folder",
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
