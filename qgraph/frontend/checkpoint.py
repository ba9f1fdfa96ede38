"""Hugging Face checkpoint files, checked before anything reads their weights.

A model folder's weights are safetensors files: an 8-byte little-endian header
length, a JSON header naming each tensor's dtype, shape and byte range, then
the bytes. A sharded model adds ``model.safetensors.index.json``, whose
``weight_map`` names the file of every tensor. Either can lie, and the
libraries that read them answer a lie with a traceback (or, for an index that
names a file outside the folder, by reading it). :func:`check_safetensors`
reads only a file's header and size and refuses the same files the
safetensors library would, in one line: a header longer than the file or not
JSON, a tensor whose bytes do not match its dtype and shape, tensors that
overlap or leave a hole, bytes past the end of the file, and a pickle or zip
checkpoint under a safetensors name. :func:`index_shards` reads an index and
refuses a ``weight_map`` entry that is absolute or climbs out with ``..``.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from qgraph.errors import ModelSourceError
from qgraph.ir.paths import Escape, EscapeError, inside

#: The largest header the safetensors library reads (its own limit).
MAX_HEADER_BYTES = 100_000_000
#: Bits per element of each safetensors dtype.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_REDO = "re-save the model with save_pretrained()"


def _bad(path: Path, why: str) -> ModelSourceError:
    return ModelSourceError(f"{path.name} in {path.parent} is not a valid safetensors file: {why}; {_REDO}")


def check_safetensors(path: Path) -> None:
    """Raise :class:`ModelSourceError` unless ``path`` is a well-formed safetensors file (only its header is read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise ModelSourceError(
                f"{path.name} in {path.parent} is not a safetensors file: it is a zip or pickle checkpoint under a safetensors name, "
                "which can run code when loaded; convert it with save_pretrained() in a trusted environment"
            )
        if len(head) < 8:
            raise _bad(path, f"it has {size} bytes, fewer than the 8 of a header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise _bad(path, f"its header claims {n} bytes, longer than the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _bad(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    _check_entries(path, header, size - 8 - n)


def _check_entries(path: Path, header: dict[str, Any], data_bytes: int) -> None:
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else ([], [])
        if not ok or not all(type(d) is int and d >= 0 for d in [*shape, *offsets]) or len(offsets) != 2:
            raise _bad(path, f"tensor '{name}' has no valid shape and data_offsets")
        bits = DTYPE_BITS.get(entry.get("dtype"))  # type: ignore[arg-type]
        if bits is None:
            raise _bad(path, f"tensor '{name}' has the unknown dtype {entry.get('dtype')!r}")
        begin, end = offsets
        need = (math.prod(shape) * bits + 7) // 8
        if end < begin or end - begin != need:
            raise _bad(path, f"tensor '{name}' ({entry['dtype']} {shape}) needs {need} bytes but its offsets give {end - begin}")
        if end > data_bytes:
            raise _bad(path, f"tensor '{name}' lies at bytes {begin}..{end}, past the end of the file ({data_bytes} bytes of data)")
        spans.append((begin, end, name))
    at, last = 0, None
    for begin, end, name in sorted(spans):
        if begin < at:
            raise _bad(path, f"tensors '{last}' and '{name}' overlap (their bytes end at {at} and start at {begin})")
        if begin > at:
            raise _bad(path, f"bytes {at}..{begin} belong to no tensor (a tensor is missing from the header)")
        at, last = end, name
    if at != data_bytes:
        raise _bad(path, f"its last {data_bytes - at} bytes belong to no tensor")


def confined(folder: Path, name: Any, what: str) -> Path:
    """``folder / name`` for a relative ``name`` that stays in ``folder``; else one line naming ``what`` refers to it."""
    try:
        # Names only: a Hugging Face cache snapshot's files are links into its blob store.
        return inside(folder, name, follow_links=False)
    except EscapeError as e:
        if e.kind is Escape.NOT_A_NAME:
            raise ModelSourceError(f"{what} names the file {name!r}, which is not a file name; {_REDO}") from None
        raise ModelSourceError(
            f"{what} sends tensors to '{name}', outside the model's folder; weight files must sit in the folder"
        ) from None


def index_shards(index: Path) -> list[Path]:
    """The shard files ``index`` (a ``*.safetensors.index.json``) names, each checked to stay in its folder."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelSourceError(f"{index.name} in {index.parent} is not a valid index: it is not JSON ({e}); {_REDO}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelSourceError(
            f"{index.name} in {index.parent} is not a valid index: its weight_map is not a map of tensor to file; {_REDO}"
        )
    if not isinstance(data.get("metadata"), dict):
        raise ModelSourceError(f"{index.name} in {index.parent} is not a valid index: it has no metadata object; {_REDO}")
    shards = sorted({confined(index.parent, name, index.name) for name in weight_map.values()})
    for shard in shards:
        if not shard.is_file():
            raise ModelSourceError(f"{shard.name}, which {index.name} lists, is missing from {shard.parent}; download the model again")
    return shards
