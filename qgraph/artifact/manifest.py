"""The artifact directory's manifest: what a compile wrote, and how to read it back.

``manifest.json`` holds the qgraph version, the target and its options, the
specializations with their files and shapes, the IO contract, the pass reports,
content hashes, the weights the runtime binds (``fed_weights``) and
``prefill_positions`` (see :mod:`qgraph.compile`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qgraph.errors import QGraphError

MANIFEST = "manifest.json"
WEIGHTS = "weights.data"
FORMAT_VERSION = 1


class ArtifactError(QGraphError):
    """An artifact directory is missing, incomplete or not one this qgraph reads."""


@dataclass
class Specialization:
    name: str
    batch_size: int
    seq_len: int
    ctx_len: int
    file: str = ""
    extra_files: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    """What ``manifest.json`` holds (see the module docstring)."""

    qgraph_version: str
    target: str
    target_options: dict[str, Any]
    batch_size: int
    ctx_len: int
    prefill_seq_len: int
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

    def spec(self, name: str) -> Specialization:
        for s in self.specializations:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @classmethod
    def load(cls, artifact_dir: str | Path) -> Manifest:
        path = Path(artifact_dir) / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"{artifact_dir} is not a qgraph artifact directory (no {MANIFEST}); run qgraph compile first")
        try:
            data = json.loads(path.read_text())
            data["specializations"] = [Specialization(**s) for s in data["specializations"]]
            manifest = cls(**data)
        except (ValueError, TypeError, KeyError) as e:
            raise ArtifactError(f"{path} is not a valid manifest ({e}); recompile the artifact") from None
        if manifest.format != FORMAT_VERSION:
            raise ArtifactError(f"{path} has format {manifest.format}, this qgraph reads {FORMAT_VERSION}; recompile the artifact")
        return manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
