"""The graph core: a thin wrapper over onnx-graphsurgeon.

This is the only module that imports onnx-graphsurgeon. Passes use the small
typed API below; a third-party pass may edit ``graph.gs`` directly.

Weights stay where they are. A model is loaded with its external data left on
disk: each external initializer becomes a :class:`_FileValues`, which reads
its bytes only when a pass asks for that one tensor's values. Saving streams
external tensors from their source file into the new weights file in chunks,
so a large model is never held in memory twice, and the 2 GB protobuf limit
never applies to the graph file.
"""

from __future__ import annotations

import collections
import copy
import heapq
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from qgraph.errors import GraphCheckError, ModelLoadError, QGraphError
from qgraph.ir.validate import external_refs, validate_model

log = logging.getLogger(__name__)

Node = gs.Node
Tensor = gs.Tensor
Constant = gs.Constant
Variable = gs.Variable

#: Models whose weights add up to more than this are saved with external data.
EXTERNAL_DATA_THRESHOLD = 64 * 1024 * 1024
#: Tensors smaller than this stay inline even in an external-data save.
INLINE_TENSOR_BYTES = 1024
#: IR version given to models built from text; the newest onnxruntime reads.
DEFAULT_IR_VERSION = 10
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


class Graph:
    """An ONNX model held as an onnx-graphsurgeon graph, weights left on disk."""

    def __init__(
        self,
        gs_graph: gs.Graph,
        *,
        base_dir: Path | None = None,
        ir_version: int = DEFAULT_IR_VERSION,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self._raw = gs_graph
        # Edits are applied lazily, in one pass over the node list, so a pass
        # that adds or removes nodes at many sites stays linear in graph size.
        self._dead: set[int] = set()
        self._before: dict[int, list[Node]] = {}
        self._after: dict[int, list[Node]] = {}
        self._pos: dict[int, int] = {}
        self.base_dir = base_dir
        self.ir_version = ir_version
        self.metadata: dict[str, str] = dict(metadata or {})
        self._name_counts: collections.Counter[str] = collections.Counter()

    @property
    def _gs(self) -> gs.Graph:
        if self._dead or self._before or self._after:
            self._sync()
        return self._raw

    @_gs.setter
    def _gs(self, value: gs.Graph) -> None:
        self._raw = value
        self._dead, self._before, self._after, self._pos = set(), {}, {}, {}

    def _sync(self) -> None:
        """Apply pending insertions and removals in one pass over the nodes."""
        out: list[Node] = []
        dead, before, after = self._dead, self._before, self._after

        def emit(n: Node) -> None:
            for b in before.pop(id(n), ()):
                emit(b)
            if id(n) not in dead:
                out.append(n)
            for a in reversed(after.pop(id(n), ())):
                emit(a)

        for n in self._raw.nodes:
            emit(n)
        self._raw.nodes = out
        self._dead, self._before, self._after = set(), {}, {}

    def position(self, node: Node) -> int:
        """A key that orders nodes as the graph does (cheap: cached, kept across edits)."""
        pos = self._pos.get(id(node))
        if pos is None:
            # Edits keep the relative order of the nodes that stay, so the
            # cache is only rebuilt when it meets a node it has not seen.
            self._pos = {id(n): i for i, n in enumerate(self._gs.nodes)}
            pos = self._pos[id(node)]
        return pos

    def last_of(self, nodes: Iterable[Node]) -> Node:
        """The node of ``nodes`` that comes last in graph order."""
        return max(nodes, key=self.position)

    # ------------------------------------------------------------------ load
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Graph:
        """Load an ONNX file; external weights stay on disk until asked for.

        The model is validated first (:func:`qgraph.validate.validate_model`):
        a malformed or hostile file raises :class:`ModelLoadError` before any
        weight is read.
        """
        p = Path(path)
        if not p.is_file():
            raise ModelLoadError(f"no ONNX file at {p}; check the path")
        if p.stat().st_size == 0:
            raise ModelLoadError(f"{p} is empty (0 bytes); it is not an ONNX model (was it written completely?)")
        try:
            model = onnx.load(str(p), load_external_data=False)
        except Exception as e:  # protobuf raises several unrelated types
            first = (str(e).strip().splitlines() or [""])[0]
            raise ModelLoadError(
                f"{p} is not a readable ONNX model ({type(e).__name__}: {first}); check that it is a complete .onnx file"
            ) from None
        try:
            return cls.from_proto(model, base_dir=p.parent)
        except ModelLoadError as e:
            raise type(e)(f"{p}: {e}") from None
        except QGraphError:
            raise
        except Exception as e:  # a malformed model that the checks above let through
            first = (str(e).strip().splitlines() or [""])[0]
            raise ModelLoadError(f"{p} is not a usable ONNX model ({type(e).__name__}: {first}); re-export it") from None

    @classmethod
    def from_proto(cls, model: onnx.ModelProto, base_dir: Path | None = None, *, validate: bool = True) -> Graph:
        """Wrap a ModelProto; external initializers are resolved against ``base_dir``.

        ``validate`` (default) checks the model first and raises
        :class:`ModelLoadError` if it is malformed; qgraph turns it off only
        for models it made itself.
        """
        externals = validate_model(model, base_dir) if validate else external_refs(model, base_dir)
        try:
            g = gs.import_onnx(model)
        except Exception as e:
            raise ModelLoadError(f"the graph could not be imported ({type(e).__name__}: {e})") from None
        for tensor in g.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.name in externals and isinstance(tensor._values, LazyValues):
                ref = externals[tensor.name]
                tensor._values = _FileValues(tensor._values.tensor, ref.path, ref.offset, ref.length)
        meta = {p.key: p.value for p in model.metadata_props}
        return cls(g, base_dir=base_dir, ir_version=model.ir_version or DEFAULT_IR_VERSION, metadata=meta)

    @classmethod
    def parse(cls, text: str) -> Graph:
        """Build a graph from ONNX text syntax (``onnx.parser``)."""
        try:
            model = onnx.parser.parse_model(text)
        except Exception as e:
            raise ModelLoadError(f"ONNX text does not parse: {e}") from None
        if not model.ir_version:
            model.ir_version = DEFAULT_IR_VERSION
        return cls.from_proto(model)

    # ------------------------------------------------------------------ views
    @property
    def gs(self) -> gs.Graph:
        """The underlying onnx-graphsurgeon graph, for passes that need it."""
        g = self._gs
        self._pos = {}  # a third-party pass may reorder the nodes
        return g

    @property
    def nodes(self) -> list[Node]:
        return list(self._gs.nodes)

    @property
    def inputs(self) -> list[Variable]:
        return list(self._raw.inputs)

    @property
    def outputs(self) -> list[Variable]:
        return list(self._raw.outputs)

    @property
    def name(self) -> str:
        return str(self._gs.name or "")

    def node_count(self) -> int:
        return len(self._gs.nodes)

    def op_counts(self) -> collections.Counter[str]:
        return collections.Counter(n.op for n in self._gs.nodes)

    def nodes_by_op(self, op: str) -> list[Node]:
        return [n for n in self._gs.nodes if n.op == op]

    def opset(self, domain: str = "") -> int | None:
        if domain in ("", "ai.onnx"):
            return int(self._gs.opset)
        for d in self._gs.import_domains or []:
            if d.domain == domain:
                return int(d.version)
        return None

    def set_opset(self, version: int) -> None:
        """Raise the default-domain opset (a fused op may need a newer one)."""
        self._gs.opset = version
        # New OperatorSetIdProtos: the old ones are shared with the source
        # ModelProto and with every copy() of this graph, which must keep theirs.
        self._gs.import_domains = [
            helper.make_opsetid(d.domain, version) if d.domain in ("", "ai.onnx") else d for d in self._gs.import_domains or []
        ]

    def import_domain(self, domain: str, version: int) -> None:
        """Import an operator domain (``com.microsoft``) if the graph does not yet; an existing import is kept."""
        if self.opset(domain) is not None:
            return
        # A new list: the old one is shared with the source ModelProto and with copies.
        self._gs.import_domains = [*(self._gs.import_domains or []), helper.make_opsetid(domain, version)]

    def tensors(self) -> dict[str, Tensor]:
        """Name -> tensor map; build it once per pass, never inside a loop."""
        return dict(self._gs.tensors())

    def producer(self, tensor: Tensor) -> Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    def consumers(self, tensor: Tensor) -> list[Node]:
        return list(tensor.outputs)

    def is_graph_output(self, tensor: Tensor) -> bool:
        return any(t is tensor for t in self._raw.outputs)

    def const_value(self, tensor: Tensor | None) -> np.ndarray | None:
        """Values of a constant tensor (initializer or Constant node), else None.

        Loads just this one tensor.
        """
        if tensor is None:
            return None
        if isinstance(tensor, gs.Constant):
            # Read without caching, so the tensor stays lazy (and external on save).
            vals = tensor._values
            return np.asarray(vals.load() if isinstance(vals, LazyValues) else vals)
        prod = tensor.inputs[0] if tensor.inputs else None
        if prod is not None and prod.op == "Constant" and prod.domain in (None, "", "ai.onnx"):
            attrs = prod.attrs
            if "value" in attrs:
                v = attrs["value"]
                return np.asarray(v.values if isinstance(v, gs.Constant) else v)
            for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
                if key in attrs:
                    return np.asarray(attrs[key], dtype=dtype)
            for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
                if key in attrs:
                    return np.asarray(list(attrs[key]), dtype=dtype)
        return None

    def is_constant(self, tensor: Tensor | None) -> bool:
        """True for an initializer or a Constant node's output (reads no values)."""
        if tensor is None:
            return False
        if isinstance(tensor, gs.Constant):
            return True
        prod = tensor.inputs[0] if tensor.inputs else None
        return prod is not None and prod.op == "Constant" and prod.domain in ("", "ai.onnx", None)

    def scalar(self, tensor: Tensor | None) -> float | None:
        """The single value of a constant with one element, else None."""
        v = self.const_value(tensor)
        if v is None or v.size != 1:
            return None
        return float(v.reshape(()))

    def weights_nbytes(self) -> int:
        total = 0
        for t in self._gs.tensors().values():
            if isinstance(t, gs.Constant):
                vals = t._values
                total += int(vals.nbytes) if isinstance(vals, LazyValues) else int(np.asarray(vals).nbytes)
        return total

    # ------------------------------------------------------------------ edit
    def fresh_name(self, prefix: str) -> str:
        """A node or tensor name ``<prefix>/<n>`` not used before in this graph."""
        if not self._name_counts:
            self._seed_names()
        while True:
            n = self._name_counts[prefix]
            self._name_counts[prefix] += 1
            name = f"{prefix}/{n}"
            if name not in self._used:
                self._used.add(name)
                return name

    def _seed_names(self) -> None:
        self._used: set[str] = set(self._gs.tensors().keys()) | {n.name for n in self._gs.nodes if n.name}
        self._name_counts[""] = 0

    def constant(self, prefix: str, values: np.ndarray | float | int, dtype: Any = None) -> Constant:
        arr = np.asarray(values, dtype=dtype)
        return gs.Constant(self.fresh_name(prefix), arr)

    def variable(self, prefix: str, dtype: Any = None, shape: Sequence[int | str | None] | None = None) -> Variable:
        return gs.Variable(self.fresh_name(prefix), dtype=dtype, shape=list(shape) if shape is not None else None)

    @staticmethod
    def omitted() -> Variable:
        """The empty tensor that stands for an omitted optional input."""
        return gs.Variable.empty()

    def add_node(
        self,
        op: str,
        inputs: Sequence[Tensor],
        outputs: Sequence[Tensor] | int = 1,
        attrs: dict[str, Any] | None = None,
        *,
        prefix: str,
        domain: str = "",
        after: Node | None = None,
        before: Node | None = None,
    ) -> Node:
        """Add a node named ``<prefix>/<n>``; ``outputs`` may be a count of new tensors.

        With ``after`` the node goes right behind that node, which keeps the
        graph in topological order when ``after`` is the last node the new one
        depends on (e.g. the last node of a matched pattern); without it the
        node is appended and the cleanup stage must sort the graph.
        ``before`` places it right in front of that node instead (e.g. the
        first node that will read it).
        """
        name = self.fresh_name(prefix)
        if isinstance(outputs, int):
            outs: list[Tensor] = [gs.Variable(self.fresh_name(prefix)) for _ in range(outputs)]
        else:
            outs = list(outputs)
        node = gs.Node(op=op, name=name, attrs=dict(attrs or {}), inputs=list(inputs), outputs=outs, domain=domain or None)
        if after is not None:
            self._after.setdefault(id(after), []).append(node)
        elif before is not None:
            self._before.setdefault(id(before), []).append(node)
        else:
            self._raw.nodes.append(node)
        return node

    def remove_nodes(self, nodes: Iterable[Node]) -> None:
        """Detach nodes (their outputs lose their producer); cleanup drops the rest."""
        for n in nodes:
            n.inputs.clear()
            n.outputs.clear()
            self._dead.add(id(n))

    def replace_uses(self, old: Tensor, new: Tensor) -> int:
        """Make every consumer of ``old`` (and the graph outputs) read ``new``."""
        count = 0
        for node in list(old.outputs):
            for i, t in enumerate(node.inputs):
                if t is old:
                    node.inputs[i] = new
                    count += 1
        for i, t in enumerate(self._raw.outputs):
            if t is old:
                self._raw.outputs[i] = new
                count += 1
        return count

    def cleanup(self) -> None:
        """Drop dead nodes and tensors, then sort topologically (the cleanup stage)."""
        g = self._gs
        if g.functions or any(isinstance(v, gs.Graph) for n in g.nodes for v in n.attrs.values()):
            g.cleanup(remove_unused_graph_inputs=False).toposort()  # subgraphs: onnx-graphsurgeon's own walk
        else:
            g.nodes = _toposorted(_live(g))
        self._pos = {}

    def copy(self) -> Graph:
        """An independent copy; weights are shared read-only (they are lazy)."""
        g = Graph(self._gs.copy(), base_dir=self.base_dir, ir_version=self.ir_version, metadata=self.metadata)
        return g

    # ------------------------------------------------------------------ export
    def to_proto(self) -> onnx.ModelProto:
        """The ModelProto; external tensors keep referring to their source file."""
        model = gs.export_onnx(self._gs, do_type_check=False)
        model.ir_version = self.ir_version
        for t in model.graph.initializer:
            # A lazily loaded tensor whose values were read is inline now.
            if t.data_location == TensorProto.EXTERNAL and not any(e.key == "location" for e in t.external_data):
                t.data_location = TensorProto.DEFAULT
        del model.metadata_props[:]
        for k, v in self.metadata.items():
            model.metadata_props.add(key=k, value=v)
        return model

    def _file_values(self) -> dict[str, _FileValues]:
        return {t.name: t._values for t in self._gs.tensors().values() if isinstance(t, gs.Constant) and isinstance(t._values, _FileValues)}

    def to_proto_inline(self) -> onnx.ModelProto:
        """The ModelProto with every weight inline (for small models and ORT from bytes)."""
        model = self.to_proto()
        lazy = self._file_values()
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL and t.name in lazy:
                t.raw_data = lazy[t.name].read_bytes()
                t.data_location = TensorProto.DEFAULT
                del t.external_data[:]
        return model

    def save(self, path: str | os.PathLike[str], *, external: bool | None = None) -> Path:
        """Write the model; weights go to ``<file>.data`` when large (or asked).

        Both files are written under temporary names and renamed when complete.
        """
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        if external is None:
            external = self.weights_nbytes() > EXTERNAL_DATA_THRESHOLD
        lazy = self._file_values()
        model = self.to_proto()
        data_name = out.name + ".data"
        tmp_files: list[Path] = []
        moved: dict[str, tuple[int, int]] = {}
        try:
            if external:
                fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", dir=out.parent)
                tmp_files.append(Path(tmp_data))
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
                for t in model.graph.initializer:
                    if t.data_location == TensorProto.EXTERNAL and t.name in lazy:
                        t.raw_data = lazy[t.name].read_bytes()
                        t.data_location = TensorProto.DEFAULT
                        del t.external_data[:]
            fd, tmp_model = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
            tmp_files.append(Path(tmp_model))
            with os.fdopen(fd, "wb") as f:
                f.write(model.SerializeToString())
            if external:
                os.replace(tmp_files[0], out.parent / data_name)
            os.replace(tmp_files[-1], out)
        except BaseException:
            for p in tmp_files:
                p.unlink(missing_ok=True)
            raise
        if external:
            # The in-memory graph now reads its weights from the new file, which
            # may have replaced the old one.
            data_path = (out.parent / data_name).resolve()
            by_name = {t.name: t for t in model.graph.initializer}
            for t in self._gs.tensors().values():
                if isinstance(t, gs.Constant) and t.name in moved:
                    offset, nbytes = moved[t.name]
                    t._values = _FileValues(copy.deepcopy(by_name[t.name]), data_path, offset, nbytes)
            self.base_dir = out.parent
        log.info("saved %s (%s)", out, "external data" if external else "inline weights")
        return out

    # ------------------------------------------------------------------ checks
    def check(self, *, shapes: bool = True) -> None:
        """Verify the graph; raises :class:`GraphCheckError` naming what is wrong.

        Topological order, unique node names, no dangling edges, the ONNX
        checker, and (``shapes``) strict shape inference.
        """
        problems = self.structure_problems()
        if problems:
            raise GraphCheckError("; ".join(problems[:10]) + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
        model = self._proto_for_checks()
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise GraphCheckError(f"ONNX checker: {str(e).strip().splitlines()[0]}") from None
        if shapes:
            try:
                onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
            except Exception as e:
                raise GraphCheckError(f"shape inference: {str(e).strip().splitlines()[0]}") from None

    def _proto_for_checks(self) -> onnx.ModelProto:
        """The model with external weights turned into typed inputs.

        The checker would look for external files relative to the current
        directory, and no check needs the weights' values.
        """
        model = self.to_proto()
        external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        if external:
            keep = [t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL]
            del model.graph.initializer[:]
            model.graph.initializer.extend(keep)
            model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
        return model

    def structure_problems(self) -> list[str]:
        """Problems with order, names and edges, without running the checker."""
        problems: list[str] = []
        available = {t.name for t in self._gs.inputs}
        available |= {t.name for t in self._gs.tensors().values() if isinstance(t, gs.Constant)}
        available.add("")  # an omitted optional input
        produced: dict[str, str] = {}
        names: collections.Counter[str] = collections.Counter(n.name for n in self._gs.nodes if n.name)
        for name, count in names.items():
            if count > 1:
                problems.append(f"node name '{name}' is used by {count} nodes")
        all_outputs = {t.name for n in self._gs.nodes for t in n.outputs}
        for node in self._gs.nodes:
            for t in node.inputs:
                if t.name not in available:
                    if t.name in all_outputs:
                        problems.append(f"node '{node.name}' ({node.op}) reads '{t.name}' before it is produced (not topologically sorted)")
                    else:
                        problems.append(f"node '{node.name}' ({node.op}) reads '{t.name}', which nothing produces (dangling edge)")
            for t in node.outputs:
                if not t.name:
                    continue  # an omitted optional output
                if t.name in produced:
                    problems.append(f"tensor '{t.name}' is produced by both '{produced[t.name]}' and '{node.name}'")
                produced[t.name] = node.name
                available.add(t.name)
        for t in self._gs.outputs:
            if t.name not in available:
                problems.append(f"graph output '{t.name}' is not produced by any node")
        return problems

    def infer_shapes(self) -> Graph:
        """Run ONNX shape inference and return the graph with shapes filled in."""
        model = self.to_proto()
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as e:
            raise GraphCheckError(f"shape inference: {str(e).strip().splitlines()[0]}") from None
        g = Graph.from_proto(inferred, base_dir=self.base_dir, validate=False)
        self.adopt(g)
        return self

    def try_infer_shapes(self) -> str | None:
        """Shape inference for passes that can do without it: returns why it failed instead of raising."""
        try:
            self.infer_shapes()
        except GraphCheckError as e:
            return str(e)
        return None

    def infer_shapes_if_missing(self, tensors: Iterable[Tensor], who: str) -> None:
        """Infer shapes once if any of ``tensors`` has none (pinned graphs carry theirs).

        For passes that can do without shapes: a failure is logged, and sites without shapes are left.
        """
        if any(t.shape is None for t in tensors) and (problem := self.try_infer_shapes()) is not None:
            log.info("%s: %s; sites without shapes are left", who, problem)

    def adopt(self, other: Graph) -> None:
        """Take ``other``'s graph in place of this one's (a pass returned a new graph)."""
        # Keep lazily loaded values from this graph (import builds fresh ones).
        mine = self._file_values()
        for t in other._gs.tensors().values():
            if isinstance(t, gs.Constant) and t.name in mine:
                t._values = mine[t.name]
        self._gs = other._gs
        self._name_counts = collections.Counter()

    def __iter__(self) -> Iterator[Node]:
        return iter(self._gs.nodes)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {self.node_count()} nodes, {len(self._gs.inputs)} inputs, {len(self._gs.outputs)} outputs)"


def remove_model_files(path: Path) -> None:
    """Delete an ONNX file and the external-data file :meth:`Graph.save` writes beside it."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


def live_node_ids(outputs: Iterable[Tensor]) -> set[int]:
    """ids of the nodes that ``outputs`` depend on (walking producers backwards)."""
    live: set[int] = set()
    seen: set[int] = set()
    stack = list(outputs)
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        for node in t.inputs:
            if id(node) not in live:
                live.add(id(node))
                stack.extend(node.inputs)
    return live


def _live(g: gs.Graph) -> list[Node]:
    """The nodes some graph output depends on, in their current order; the rest are detached."""
    live = live_node_ids(g.outputs)
    keep = []
    for n in g.nodes:
        if id(n) in live:
            keep.append(n)
        else:
            n.inputs.clear()
            n.outputs.clear()
    return keep


def _toposorted(nodes: list[Node]) -> list[Node]:
    """Kahn's algorithm; ties keep the current order, so a sorted graph is unchanged."""
    index = {id(n): i for i, n in enumerate(nodes)}
    deps = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        producers = {index[id(p)] for t in n.inputs for p in t.inputs if id(p) in index and index[id(p)] != i}
        deps[i] = len(producers)
        for j in producers:
            users[j].append(i)
    ready = [i for i, d in enumerate(deps) if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            deps[u] -= 1
            if deps[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise GraphCheckError("the graph has a cycle; no topological order exists")
    return order


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
