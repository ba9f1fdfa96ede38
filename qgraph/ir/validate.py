"""Validate an ONNX model before qgraph reads its weights or writes anything.

:func:`validate_model` runs on every model :meth:`qgraph.Graph.load` and
:meth:`qgraph.Graph.from_proto` take in, and refuses a malformed or hostile one
with a :class:`~qgraph.errors.ModelLoadError` that says what is wrong and what
to do. It checks, in this order:

* there is a graph, and it has outputs;
* every tensor stored in the model (initializers, and tensors in node
  attributes, subgraphs and function bodies): a defined data type, dimensions
  that are not negative, rank at most :data:`MAX_RANK`, at most
  :data:`MAX_TENSOR_BYTES`, and stored data whose size matches its dtype and
  shape;
* external data (the main graph's initializers only; anywhere else it is
  refused): a relative location that stays inside the model's folder (no
  absolute path, no ``..``, no symlink that leads out), a file that exists,
  and an offset and length that lie inside it. Only file metadata is read
  here; the weights themselves are not;
* graph inputs, outputs and value_info: no negative dimension, rank at most
  :data:`MAX_RANK`, and no static size above :data:`MAX_TENSOR_BYTES`;
* nodes: an op type, an op that the imported opset of a standard domain
  defines, and an opset import for every domain a node uses (custom domains
  and model-local functions are legal);
* structure: each tensor made once, every input made by something (a graph
  input, an initializer or a node; ``""`` is an omitted optional input), and
  no cycle. An acyclic graph whose nodes are out of order is accepted;
* types: ONNX type inference, on a copy without the weights; only type errors
  are fatal (a node that binds one type parameter to two element types, or a
  declared type that contradicts the inferred one).

The nodes, structure and value_info checks run on every body
(:mod:`qgraph.ir.bodies`): the main graph, each ``If``/``Loop``/``Scan``
subgraph at any depth, and each model-local function, where a subgraph may
read the names of the graphs around it. All of it is linear in the size of
the model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import GraphProto, TensorProto, helper

from qgraph.errors import InvalidModelError, ModelLoadError
from qgraph.ir.bodies import Body, attribute_tensors, check_structure, iter_bodies
from qgraph.ir.paths import Escape, EscapeError, inside

#: Tensors may have at most this many dimensions.
MAX_RANK = 64
#: No tensor may be larger than this (1 TiB).
MAX_TENSOR_BYTES = 1 << 40
#: Domains whose ops ONNX itself defines (a node from any other domain is a custom op).
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training")
#: Bits per element of the sub-byte types (packed in raw_data).
_SUB_BYTE_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(TensorProto, name)
}
_COMPLEX = (TensorProto.COMPLEX64, TensorProto.COMPLEX128)


@dataclass(frozen=True)
class ExternalRef:
    """Where an external initializer's bytes are: a checked file inside the model's folder."""

    path: Path
    offset: int
    length: int


def is_custom_domain(domain: str | None) -> bool:
    """True for a node domain that ONNX does not define (``com.example``, ``com.microsoft``)."""
    return (domain or "") not in STANDARD_DOMAINS


def is_onnx_op(node: Any, *ops: str) -> bool:
    """True for a node that is one of ONNX's ``ops``; a custom-domain op of the same name is not."""
    return node is not None and node.op in ops and not is_custom_domain(node.domain)


def validate_model(model: onnx.ModelProto, base_dir: Path | None = None) -> dict[str, ExternalRef]:
    """Raise :class:`ModelLoadError` if ``model`` is malformed or unsafe (module docstring).

    ``base_dir`` is the model's folder, against which external data is
    resolved. Returns the external initializers by name.
    """
    if not model.HasField("graph"):
        raise InvalidModelError("the model has no graph; it is not a usable ONNX model (check that the file is an ONNX model)")
    if model.ir_version > onnx.IR_VERSION:
        raise InvalidModelError(
            f"the model has IR version {model.ir_version}, newer than this onnx ({onnx.__version__}) reads ({onnx.IR_VERSION}); upgrade onnx or re-export the model"
        )
    g = model.graph
    if not g.output:
        what = "is empty (no nodes and no outputs)" if not g.node else "has no outputs"
        raise InvalidModelError(f"the graph {what}; an ONNX graph must declare at least one output")
    _check_opset_imports(model)
    bodies = list(iter_bodies(model))
    externals = _check_stored_tensors(g, bodies, base_dir)
    for body in bodies:
        _check_value_infos(body.graph or g, body)
    functions = {(f.domain, f.name) for f in model.functions}
    for body in bodies:
        _check_ops(body, functions)
    orders = [check_structure(body) for body in bodies]
    _check_types(model, orders[0])
    return externals


# ---------------------------------------------------------------- stored tensors
def _tensor_bytes(t: TensorProto, where: str) -> int | None:
    """Bytes ``t``'s dtype and dims need (None for strings); raises if either is invalid."""
    dt = t.data_type
    if dt == TensorProto.UNDEFINED:
        raise InvalidModelError(f"{where} has no data type (UNDEFINED); the model is malformed: re-export it")
    if dt not in TensorProto.DataType.values():
        raise InvalidModelError(f"{where} has the unknown data type {dt}; re-export the model with a standard ONNX type")
    dims = list(t.dims)
    _check_dims(dims, where)
    if dt == TensorProto.STRING:
        return None
    n = math.prod(dims)
    bits = _SUB_BYTE_BITS.get(dt)
    if bits is not None:
        nbytes = (n * bits + 7) // 8
    else:
        try:
            nbytes = n * np.dtype(helper.tensor_dtype_to_np_dtype(dt)).itemsize
        except (KeyError, TypeError, ValueError):
            return None  # a type this onnx cannot size: nothing to compare with
    if nbytes > MAX_TENSOR_BYTES:
        raise InvalidModelError(
            f"{where} would take {nbytes} bytes (shape {dims}), more than the {MAX_TENSOR_BYTES >> 40} TiB limit; the dimensions are absurd"
        )
    return nbytes


def _check_dims(dims: list[int], where: str) -> None:
    if len(dims) > MAX_RANK:
        raise InvalidModelError(f"{where} has rank {len(dims)}, more than {MAX_RANK}; the shape is absurd")
    bad = [d for d in dims if d < 0]
    if bad:
        raise InvalidModelError(f"{where} has the negative dimension {bad[0]} (shape {dims}); dimensions must be 0 or more")


def _check_data(t: TensorProto, nbytes: int | None, where: str) -> None:
    """The inline data of ``t`` has as many bytes (or values) as its dtype and dims need."""
    n = math.prod(t.dims)
    if t.HasField("raw_data"):
        if t.data_type == TensorProto.STRING:
            raise InvalidModelError(f"{where} is a string tensor with raw_data; strings must be in string_data")
        have = len(t.raw_data)
        ok = have == nbytes or (t.data_type in _SUB_BYTE_BITS and have == n)
        if nbytes is not None and not ok:
            raise InvalidModelError(
                f"{where} holds {have} bytes of data but a {_dtype_name(t.data_type)} tensor of shape {list(t.dims)} needs {nbytes}; "
                "its data is truncated or its dtype is wrong: re-export the model"
            )
        return
    try:
        field = helper.tensor_dtype_to_field(t.data_type)
    except (KeyError, TypeError, ValueError):
        return
    have = len(getattr(t, field))
    want = {2 * n} if t.data_type in _COMPLEX else {n, -(-n * _SUB_BYTE_BITS[t.data_type] // 32)} if t.data_type in _SUB_BYTE_BITS else {n}
    if have not in want:
        raise InvalidModelError(
            f"{where} holds {have} values but a {_dtype_name(t.data_type)} tensor of shape {list(t.dims)} needs {min(want)}; "
            "its data is truncated or its dtype is wrong: re-export the model"
        )


def _dtype_name(dt: int) -> str:
    try:
        return TensorProto.DataType.Name(dt).lower()
    except ValueError:
        return f"type-{dt}"


def _check_stored_tensors(g: GraphProto, bodies: list[Body], base_dir: Path | None) -> dict[str, ExternalRef]:
    externals: dict[str, ExternalRef] = {}
    seen: set[str] = set()
    for t in g.initializer:
        where = f"initializer '{t.name}'"
        if t.name in seen:
            raise InvalidModelError(f"{where} is given twice; initializer names must be unique")
        seen.add(t.name)
        nbytes = _tensor_bytes(t, where)
        if t.data_location == TensorProto.EXTERNAL:
            externals[t.name] = _external_ref(t, nbytes, base_dir)
        else:
            _check_data(t, nbytes, where)
    for t, where in attribute_tensors(bodies):
        nbytes = _tensor_bytes(t, where)
        if t.data_location == TensorProto.EXTERNAL:
            raise InvalidModelError(
                f"{where} keeps its data in an external file; qgraph reads external data only for initializers: "
                "save the model with that tensor inline (or as an initializer)"
            )
        _check_data(t, nbytes, where)
    return externals


# ---------------------------------------------------------------- external data
_EXTERNAL_ESCAPES = {
    Escape.NOT_A_NAME: "has no usable location; external data must name a file in the model's folder",
    Escape.ABSOLUTE: "is not a relative path; external data must sit in the model's folder",
    Escape.DOTDOT: "points outside the model's folder ('..'); move the weights beside the model",
    Escape.UNRESOLVABLE: "cannot be resolved ({detail}); move the weights beside the model",
    Escape.LINKS_OUT: "resolves outside the model's folder; move the weights beside the model",
}


def resolve_external_path(base_dir: Path, location: str, tensor_name: str) -> Path:
    """Return the file an external tensor's ``location`` names, refusing escapes.

    A location must be a relative path that stays inside the model's folder
    (no absolute paths, no ``..``, no symlink that points outside). Only the
    path is resolved; the file is not opened.
    """
    where = f"external data of tensor '{tensor_name}' ('{location}')"
    try:
        path = inside(base_dir, location)
    except EscapeError as e:
        raise ModelLoadError(f"{where} {_EXTERNAL_ESCAPES[e.kind].format(detail=e.detail)}") from None
    if not path.is_file():
        raise ModelLoadError(f"{where} is missing: expected the file {path}")
    return path


def _external_ref(t: TensorProto, nbytes: int | None, base_dir: Path | None) -> ExternalRef:
    info = {e.key: e.value for e in t.external_data}
    if base_dir is None:
        raise ModelLoadError(f"tensor '{t.name}' has external data but the model has no folder; load it from a file")
    path = resolve_external_path(base_dir, info.get("location", ""), t.name)
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else nbytes
    except ValueError:
        raise InvalidModelError(
            f"external data of tensor '{t.name}' has a non-numeric offset or length ({info}); re-export the model"
        ) from None
    if length is None:
        raise InvalidModelError(f"external data of tensor '{t.name}' ({_dtype_name(t.data_type)}) gives no length; re-export the model")
    if nbytes is not None and length != nbytes:
        raise InvalidModelError(
            f"external data of tensor '{t.name}' is {length} bytes but a {_dtype_name(t.data_type)} tensor of shape "
            f"{list(t.dims)} needs {nbytes}; the weights file does not match the model: re-export it"
        )
    if offset < 0 or length < 0 or offset + length > path.stat().st_size:
        raise ModelLoadError(f"external data of tensor '{t.name}' lies past the end of {path.name}; the weights file is truncated")
    return ExternalRef(path, offset, length)


def external_refs(model: onnx.ModelProto, base_dir: Path | None) -> dict[str, ExternalRef]:
    """Just the external-data checks, for models qgraph made itself (see :func:`validate_model`)."""
    return {
        t.name: _external_ref(t, _tensor_bytes(t, f"initializer '{t.name}'"), base_dir)
        for t in model.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    }


# ---------------------------------------------------------------- inputs, outputs, value_info
def _check_value_infos(g: GraphProto, body: Body) -> None:
    for kind, infos in (("graph input", g.input), ("graph output", g.output), ("value_info", g.value_info)):
        for vi in infos:
            if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
                continue
            tt = vi.type.tensor_type
            where = body.of(f"{kind} '{vi.name}'")
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            known = [d for d in dims if d is not None]
            _check_dims(known, where)
            try:
                itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
            except (KeyError, TypeError, ValueError):
                itemsize = 1
            if math.prod(known) * itemsize > MAX_TENSOR_BYTES:
                shown = ["?" if d is None else d for d in dims]
                raise InvalidModelError(f"{where} has the shape {shown}, over {MAX_TENSOR_BYTES >> 40} TiB; the dimensions are absurd")


# ---------------------------------------------------------------- ops and opsets
def _check_opset_imports(model: onnx.ModelProto) -> None:
    newest = onnx.defs.onnx_opset_version()
    for imp in [*model.opset_import, *(i for f in model.functions for i in f.opset_import)]:
        domain = "" if imp.domain == "ai.onnx" else imp.domain
        shown = f"domain '{domain}'" if domain else "the default ONNX domain"
        if imp.version < 1:
            raise InvalidModelError(f"the model imports opset {imp.version} of {shown}; opset versions start at 1: re-export the model")
        if domain == "" and imp.version > newest:
            raise InvalidModelError(
                f"the model imports opset {imp.version}, newer than this onnx ({onnx.__version__}) knows ({newest}); upgrade onnx or export at opset {newest} or lower"
            )


def _check_ops(body: Body, functions: set[tuple[str, str]]) -> None:
    opsets = body.opsets
    for node in body.nodes:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        what = body.of(f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type or 'nameless'} node")
        if not node.op_type:
            raise InvalidModelError(f"{what} has no op type; the model is malformed: re-export it")
        if (node.domain, node.op_type) in functions:
            continue
        if domain not in opsets:
            shown = f"domain '{domain}'" if domain else "the default ONNX domain"
            raise InvalidModelError(f"{what} is from {shown}, but the model imports no opset for it; add an opset_import for it")
        if domain in STANDARD_DOMAINS and not onnx.defs.has(node.op_type, opsets[domain], domain):
            where = f"opset {opsets[domain]}" + (f" of '{domain}'" if domain else "")
            if onnx.defs.has(node.op_type, domain):
                since = onnx.defs.get_schema(node.op_type, domain=domain).since_version
                raise InvalidModelError(f"{what} needs opset {since} or newer, but the model imports {where}; raise the model's opset")
            raise InvalidModelError(f"{what} is not an ONNX op ({where} has no {node.op_type}); put custom ops in a custom domain")


# ---------------------------------------------------------------- types
#: What ONNX type inference says when a graph's types contradict each other.
_TYPE_ERRORS = ("inconsistent type", "Inferred elem type differs", "bound to different types")


def _check_types(model: onnx.ModelProto, order: list[int]) -> None:
    """ONNX type inference on a sorted copy without the weights; type contradictions are fatal."""
    g = model.graph
    light = onnx.ModelProto()
    light.ir_version = model.ir_version or 10
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    lg = light.graph
    lg.name = g.name
    lg.node.extend(g.node[i] for i in order)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    names = {vi.name for vi in g.input}
    lg.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer if t.name not in names)
    try:
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
    except Exception as e:  # InferenceError, or a checker error on something inference cannot take
        lines = [ln.strip() for ln in str(e).splitlines() if any(t in ln for t in _TYPE_ERRORS)]
        if lines:
            first = re.sub(r"\[\w+InferenceError\]\s*|Inference error\(s\):\s*", "", lines[0])
            first = re.sub(r"\((\d+)\) vs \((\d+)\)", lambda m: f"{_dtype_name(int(m[1]))} vs {_dtype_name(int(m[2]))}", first)
            more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
            raise InvalidModelError(
                f"the graph's types do not agree: {first}{more}; fix the dtypes of the inputs or re-export the model"
            ) from None
