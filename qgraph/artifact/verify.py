"""Checking a folder's files against the content hashes recorded when it was written.

An artifact's ``manifest.json`` (and a cached export's ``export.json``) records
a sha256 per file. :func:`verify_artifact` checks, before anything is loaded:
the record has a real digest for every file (none missing, none zeroed), every
file the manifest names and every external-data file its graphs read is
hashed, and each hashed file has its recorded content. The first problem
raises :class:`ArtifactError`, one line naming the file.

Hashing gpt2-small's artifact (650 MB) takes about as long as opening its
sessions, so a verification is recorded in ``.verified.json`` beside the files:
the manifest's digest and each file's (device, inode, size, mtime, ctime). A
file whose stat is unchanged since it was verified is not hashed again. Any
write changes the change time (ctime), which no user can set back, and a copy
changes the inode, so a changed file is always hashed again. A file changed
within the file system's timestamp resolution of its verification could keep
its stat: files younger than :data:`RECENT_NS` at verification are never
recorded. The record is an optimization only: where it cannot be written (a
read-only cache) or read, every file is hashed, once per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from qgraph.artifact.manifest import MANIFEST, ArtifactError, Manifest, confined, sha256_file
from qgraph.ir.files import new_file_mode

#: Where a folder's last verification is recorded.
STAMP = ".verified.json"
#: Files changed this recently when they are verified are hashed again next time (timestamps are coarse).
RECENT_NS = 2 * 10**9
_DIGEST = re.compile(r"[0-9a-f]{64}")
#: Verifications recorded in this process (for folders where the record cannot be written).
_SEEN: dict[str, dict[str, Any]] = {}


def now_ns() -> int:
    return time.time_ns()


def hash_tree(folder: Path, skip: Iterable[str] = (MANIFEST, STAMP)) -> dict[str, str]:
    """The sha256 of every regular file under ``folder`` (relative POSIX names), except the top-level ``skip``."""
    skipped = set(skip)
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.relative_to(folder).as_posix() not in skipped
    }


def verify_artifact(folder: Path, manifest: Manifest) -> None:
    """Check an artifact directory against its manifest (see the module docstring)."""
    required = {name for _, name in manifest.named_files()}
    verify_files(folder, manifest.hashes, required, record=MANIFEST, graphs=[s.file for s in manifest.specializations])


def verify_files(folder: Path, hashes: Mapping[str, str], required: Iterable[str], *, record: str, graphs: Iterable[str]) -> None:
    """Check ``folder``'s files against ``hashes``, which ``folder/record`` holds.

    ``required``: files that must be hashed; ``graphs``: ONNX files whose external data files must be too.
    """
    where = folder / record
    if not hashes:
        raise ArtifactError(f"{where} records no content hashes, so its files cannot be checked; recompile the artifact")
    for name in sorted(hashes):
        confined(folder, name, "a hashed file")
        if not _DIGEST.fullmatch(hashes[name]) or not hashes[name].strip("0"):
            raise ArtifactError(f"{where} has no valid sha256 for {name} ({hashes[name][:16]!r}...); recompile the artifact")
    unhashed = sorted(set(required) - set(hashes))
    if unhashed:
        raise ArtifactError(f"{where} has no hash for {unhashed[0]}, which the artifact uses; recompile the artifact")
    _check_contents(folder, hashes, where)
    for graph in graphs:
        for location in _external_files(folder, graph, where):
            if location not in hashes:
                raise ArtifactError(f"{where} has no hash for {location}, which {graph} reads; recompile the artifact")


def _check_contents(folder: Path, hashes: Mapping[str, str], where: Path) -> None:
    try:
        manifest_digest = hashlib.sha256(where.read_bytes()).hexdigest()
    except OSError as e:
        raise ArtifactError(f"{where} cannot be read ({e.strerror or e}); recompile the artifact") from None
    key = str(folder.resolve())
    seen = _SEEN.get(key) or _read_stamp(folder)
    trusted = seen.get("files", {}) if seen.get("manifest") == manifest_digest else {}
    started = now_ns()
    stats: dict[str, list[int]] = {}
    for name in sorted(hashes):
        path = folder / name
        try:
            st = path.stat()
        except OSError:
            raise ArtifactError(f"{path} is missing; the artifact is incomplete: recompile it") from None
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
            raise ArtifactError(f"{path} is not a regular file; recompile the artifact")
        stats[name] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        if trusted.get(name) == stats[name]:
            continue
        try:
            digest = sha256_file(path)
        except OSError as e:
            raise ArtifactError(f"{path} cannot be read ({e.strerror or e}); recompile the artifact") from None
        if digest != hashes[name]:
            raise ArtifactError(
                f"{path} ({st.st_size} bytes) does not match its sha256 in {where.name}: it was changed or damaged; recompile the artifact"
            )
    # Only files old enough that a later write must change their stat are recorded.
    settled = {name: s for name, s in stats.items() if max(s[3], s[4]) < started - RECENT_NS}
    stamp = {"manifest": manifest_digest, "files": settled}
    if settled and stamp != seen:  # an unchanged record is not written again
        _SEEN[key] = stamp
        _write_stamp(folder, stamp)


def forget_verification(folder: Path) -> None:
    """Drop the record of ``folder``'s last verification (on disk and in this process): the next open hashes every file."""
    _SEEN.pop(str(folder.resolve()), None)
    with contextlib.suppress(OSError):
        (folder / STAMP).unlink()


def _read_stamp(folder: Path) -> dict[str, Any]:
    text = read_small_file(folder / STAMP)
    try:
        data = json.loads(text) if text is not None else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {}


def read_small_file(path: Path, limit: int = 1 << 20) -> str | None:
    """The text of ``path`` if it is a regular file of at most ``limit`` bytes, else None (never blocks on a FIFO)."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _write_stamp(folder: Path, stamp: dict[str, Any]) -> None:
    """Best effort: a folder that cannot be written (a read-only cache) is verified again next time."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{STAMP}.", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(stamp, f)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, folder / STAMP)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _external_files(folder: Path, graph: str, where: Path) -> list[str]:
    """The external-data files the ONNX file ``folder/graph`` reads (confined to ``folder``), as hash keys."""
    path = folder / graph
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several unrelated types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ArtifactError(f"{path} is not a readable ONNX model ({first}); recompile the artifact") from None
    out: set[str] = set()
    for t in _tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            rel = (Path(graph).parent / location).as_posix()
            confined(folder, rel, f"external data of tensor '{t.name}' in {graph}")
            out.add(os.path.normpath(rel))
    return sorted(out)


def _tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor of the model: initializers and attribute tensors, in subgraphs and functions too."""
    graphs = [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            yield from (s.values for s in g.sparse_initializer)
            nodes.extend(g.node)
            continue
        for a in nodes.pop().attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                graphs.append(a.g)
            graphs.extend(a.graphs)
