"""One weights file shared by several graphs, and the weights the runtime binds itself.

Each specialization of a compile is saved with its own external weights; the
weights are the same tensors, so they are moved into one file, keyed by their
content, and every graph is pointed at it. Tensors are copied one at a time.
Large MatMul weights may be left to the runtime (``fed_weights``), which reads
them back with :func:`read_fed_weights`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from qgraph.artifact.manifest import ArtifactError
from qgraph.ir.files import copy_range
from qgraph.ir.validate import resolve_external_path

_ALIGN = 64


def share_weights(folder: Path, models: list[Path], name: str) -> dict[str, int]:
    """Rewrite ``models`` (all in ``folder``) to read their weights from ``folder/name``.

    Returns {"tensors": unique tensors written, "bytes": their size}.
    """
    protos = {m: onnx.load(str(m), load_external_data=False) for m in models}
    old_files: set[Path] = set()
    seen: dict[str, tuple[int, int]] = {}
    tmp = folder / f".{name}.tmp"
    with open(tmp, "wb") as out:
        for proto in protos.values():
            for t in proto.graph.initializer:
                if t.data_location != TensorProto.EXTERNAL:
                    continue
                info = {e.key: e.value for e in t.external_data}
                src = resolve_external_path(folder, info["location"], t.name)
                old_files.add(src)
                offset, length = int(info.get("offset", 0)), int(info["length"])
                digest = _digest(src, offset, length)
                if digest not in seen:
                    out.write(b"\0" * ((-out.tell()) % _ALIGN))
                    seen[digest] = (out.tell(), length)
                    copy_range(src, offset, length, out)
                new_offset, _ = seen[digest]
                del t.external_data[:]
                for k, v in (("location", name), ("offset", str(new_offset)), ("length", str(length))):
                    t.external_data.add(key=k, value=v)
    for m, proto in protos.items():
        onnx.save(proto, str(m))
    os.replace(tmp, folder / name)
    for f in old_files:
        if f.name != name:
            f.unlink(missing_ok=True)
    return {"tensors": len(seen), "bytes": sum(length for _, length in seen.values())}


def _digest(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(1 << 24, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return f"{h.hexdigest()}:{length}"


def feed_large_weights(folder: Path, models: list[Path], min_bytes: int) -> dict[str, dict[str, object]]:
    """Turn each MatMul's fp32 2-D weight of at least ``min_bytes`` into a graph input of ``models``.

    ONNX Runtime pre-packs constant MatMul weights into its own buffers; for a
    [1, K] x [K, N] product as large as GPT-2's vocabulary projection, its GEMV
    kernel reading the plain weight is faster (PERFORMANCE.md), and the runtime
    then binds one copy to every specialization instead of each session
    holding its own packed copy. Returns, per tensor name, where its bytes are
    (``file``, ``offset``, ``length``) and its ``shape`` and ``dtype``: the
    runtime reads them from there and binds them as inputs.
    """
    fed: dict[str, dict[str, object]] = {}
    for m in models:
        proto = onnx.load(str(m), load_external_data=False)
        inits = {t.name: t for t in proto.graph.initializer}
        names = {
            n.input[1]
            for n in proto.graph.node
            if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and len(n.input) == 2 and n.input[1] in inits
        }
        changed = False
        for name in sorted(names):
            t = inits[name]
            if t.data_type != TensorProto.FLOAT or len(t.dims) != 2 or t.data_location != TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            length = int(info["length"])
            if length < min_bytes:
                continue
            fed[name] = {"file": info["location"], "offset": int(info.get("offset", 0)), "length": length,
                         "shape": [int(d) for d in t.dims], "dtype": "float32"}  # fmt: skip
            proto.graph.initializer.remove(t)
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, list(t.dims)))
            changed = True
        if changed:
            onnx.save(proto, str(m))
    return fed


def read_fed_weights(folder: Path, fed: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The weights an artifact leaves to the runtime (``Manifest.fed_weights``), by name.

    Names that share a byte range share one array. A file that is missing or
    ends early raises :class:`ArtifactError` naming the weight.
    """
    arrays: dict[tuple[str, int, int], np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    for name, w in fed.items():
        key = (str(w["file"]), int(w["offset"]), int(w["length"]))
        if key not in arrays:
            path = resolve_external_path(folder, key[0], name)  # stays inside the artifact
            dtype = np.dtype(w["dtype"])
            count = key[2] // dtype.itemsize
            try:
                values = np.fromfile(path, dtype=dtype, count=count, offset=key[1])
            except OSError as e:
                raise ArtifactError(f"cannot read weight '{name}' from {path}: {e}; recompile the artifact") from None
            if values.size != count:
                raise ArtifactError(f"{path} ends before weight '{name}' ({values.size} of {count} values); recompile the artifact")
            arrays[key] = values.reshape(w["shape"])
        out[name] = arrays[key]
    return out
