"""The graph's files: reading and writing ONNX files with the weights left on disk.

A model is loaded with its external data left on disk: each external
initializer becomes a :class:`_FileValues`, which reads its bytes only when a
pass asks for that one tensor's values. Saving streams external tensors from
their source file into the new weights file in chunks, so a large model is
never held in memory twice, and the 2 GB protobuf limit never applies to the
graph file. Both files are written under temporary names and renamed when
complete, with the mode the umask gives a new file.

These helpers work on onnx-graphsurgeon graphs and ModelProtos, never on a
:class:`qgraph.ir.graph.Graph`: the graph core calls them from ``load``,
``from_proto``, ``to_proto_inline``, ``save`` and ``adopt``.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from qgraph.errors import DiskSpaceError, ModelLoadError
from qgraph.ir.validate import ExternalRef

#: Models whose weights add up to more than this are saved with external data.
EXTERNAL_DATA_THRESHOLD = 64 * 1024 * 1024
#: Tensors smaller than this stay inline even in an external-data save.
INLINE_TENSOR_BYTES = 1024
_COPY_CHUNK = 16 * 1024 * 1024
_ALIGN = 64


class _FileValues(LazyValues):  # type: ignore[misc]
    """Lazy values of an external tensor, read from an already validated file."""

    def __init__(self, tensor: TensorProto, path: Path, offset: int, length: int) -> None:
        super().__init__(tensor)
        self.path = path
        self.offset = offset
        self.length = length

    def load(self) -> np.ndarray:
        np_dtype = helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        count = self.length // np.dtype(np_dtype).itemsize
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            arr = np.fromfile(f, dtype=np_dtype, count=count)
        return arr.reshape(tuple(self.tensor.dims))

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.length)


def file_backed(tensor: TensorProto, ref: ExternalRef | None) -> LazyValues:
    """Lazy values of ``tensor``: read from its checked external file (``ref``), else from the proto."""
    return _FileValues(tensor, ref.path, ref.offset, ref.length) if ref is not None else LazyValues(tensor)


# ---------------------------------------------------------------------- load
def read_model(p: Path) -> onnx.ModelProto:
    """The ModelProto of the ONNX file ``p``, external data left on disk.

    A missing, empty or unreadable file raises :class:`ModelLoadError`.
    """
    if not p.is_file():
        raise ModelLoadError(f"no ONNX file at {p}; check the path")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p} is empty (0 bytes); it is not an ONNX model (was it written completely?)")
    try:
        return onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises several unrelated types
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelLoadError(
            f"{p} is not a readable ONNX model ({type(e).__name__}: {first}); check that it is a complete .onnx file"
        ) from None


def attach_file_values(g: gs.Graph, externals: Mapping[str, ExternalRef]) -> None:
    """Give each external initializer of ``g`` lazy values read from its (validated) file."""
    for tensor in g.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.name in externals and isinstance(tensor._values, LazyValues):
            ref = externals[tensor.name]
            tensor._values = _FileValues(tensor._values.tensor, ref.path, ref.offset, ref.length)


def file_values(g: gs.Graph, extra: Iterable[gs.Constant] = ()) -> dict[str, _FileValues]:
    """Name -> lazy values of every constant of ``g`` (and of ``extra``) that is still read from its file."""
    constants = [*g.tensors().values(), *extra]
    return {t.name: t._values for t in constants if isinstance(t, gs.Constant) and isinstance(t._values, _FileValues)}


# ---------------------------------------------------------------------- save
def inline_file_values(model: onnx.ModelProto, lazy: Mapping[str, _FileValues]) -> None:
    """Read the external initializers of ``model`` that ``lazy`` holds into ``raw_data``."""
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL and t.name in lazy:
            t.raw_data = lazy[t.name].read_bytes()
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]


def process_umask() -> int:
    """The process's umask (Linux says it without changing it: os.umask can only be read by setting it, which races other threads)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def new_file_mode() -> int:
    """The mode ``open`` gives a new file under the process's umask (``mkstemp`` makes its files 0600 whatever the umask)."""
    return 0o666 & ~process_umask()


def free_bytes(folder: Path) -> int:
    """Bytes an ordinary user may still write on ``folder``'s filesystem (the probe tests replace)."""
    return shutil.disk_usage(folder).free


def check_room(model: onnx.ModelProto, out: Path, lazy: Mapping[str, _FileValues]) -> None:
    """Raise :class:`DiskSpaceError` unless writing ``model`` (and the weights ``lazy`` holds) fits beside ``out``.

    A weights file may be sparse: a tiny model can declare a terabyte that its
    file does not hold, and copying it would fill the disk. So the bytes to
    write are counted from what the model declares, before anything is written.
    """
    sources = [lazy[t.name] for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL and t.name in lazy]
    needed = model.ByteSize() + sum(s.length for s in sources) + _ALIGN * len(model.graph.initializer)
    free = free_bytes(out.parent)
    if needed <= free:
        return
    hint = ""
    files = {s.path for s in sources}
    declared = sum(s.length for s in sources)
    held = sum(p.stat().st_blocks * 512 for p in files)
    if declared > 2 * held:
        hint = f" (its weights come from a sparse file: {human_bytes(declared)} declared, {human_bytes(held)} on disk)"
    raise DiskSpaceError(
        f"writing {out.name} needs {human_bytes(needed)} but {out.parent} has {human_bytes(free)} free{hint}; "
        "free some space or write the output elsewhere"
    )


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def write_model(model: onnx.ModelProto, out: Path, lazy: Mapping[str, _FileValues], *, external: bool) -> dict[str, tuple[int, int]]:
    """Write ``model`` to ``out``; with ``external`` its large weights go to ``<out>.data``.

    ``lazy`` (:func:`file_values`) gives the source of each tensor still on
    disk; its bytes are streamed, never held whole. The free space is checked
    first (:func:`check_room`); both files are written under temporary names
    and renamed when complete. Returns name -> (offset, length) of each tensor
    written to the weights file.
    """
    check_room(model, out, lazy)
    data_name = out.name + ".data"
    tmp_files: list[Path] = []
    moved: dict[str, tuple[int, int]] = {}
    try:
        if external:
            fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", dir=out.parent)
            tmp_files.append(Path(tmp_data))
            os.fchmod(fd, new_file_mode())
            with os.fdopen(fd, "wb") as f:
                for t in model.graph.initializer:
                    src = lazy.get(t.name) if t.data_location == TensorProto.EXTERNAL else None
                    nbytes = src.length if src is not None else len(t.raw_data)
                    if src is None and (not t.HasField("raw_data") or nbytes < INLINE_TENSOR_BYTES):
                        continue  # small or typed-field tensors stay inline
                    pad = (-f.tell()) % _ALIGN
                    f.write(b"\0" * pad)
                    offset = f.tell()
                    if src is not None:
                        copy_range(src.path, src.offset, src.length, f)
                    else:
                        f.write(t.raw_data)
                        t.ClearField("raw_data")
                    t.data_location = TensorProto.EXTERNAL
                    del t.external_data[:]
                    for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(nbytes))):
                        t.external_data.add(key=k, value=v)
                    moved[t.name] = (offset, nbytes)
        else:
            inline_file_values(model, lazy)
        fd, tmp_model = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        tmp_files.append(Path(tmp_model))
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        if external:
            os.replace(tmp_files[0], out.parent / data_name)
        os.replace(tmp_files[-1], out)
    except BaseException:
        for p in tmp_files:
            p.unlink(missing_ok=True)
        raise
    return moved


def reattach_file_values(
    g: gs.Graph, model: onnx.ModelProto, moved: Mapping[str, tuple[int, int]], data_path: Path, extra: Iterable[gs.Constant] = ()
) -> None:
    """Make the tensors :func:`write_model` moved (of ``g`` and ``extra``) read their values from ``data_path``, the file just written."""
    by_name = {t.name: t for t in model.graph.initializer}
    for t in [*g.tensors().values(), *extra]:
        if isinstance(t, gs.Constant) and t.name in moved:
            offset, nbytes = moved[t.name]
            t._values = _FileValues(copy.deepcopy(by_name[t.name]), data_path, offset, nbytes)


def remove_model_files(path: Path) -> None:
    """Delete an ONNX file and the external-data file :meth:`Graph.save` writes beside it."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


def copy_range(src: Path, offset: int, length: int, dst: Any) -> None:
    """Stream ``length`` bytes of ``src`` from ``offset`` into the open file ``dst``."""
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(_COPY_CHUNK, left))
            if not chunk:
                raise ModelLoadError(f"{src} ended early while copying weights; the weights file is truncated")
            dst.write(chunk)
            left -= len(chunk)
