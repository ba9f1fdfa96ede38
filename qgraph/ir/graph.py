"""The graph core: a thin wrapper over onnx-graphsurgeon.

Only this package imports onnx-graphsurgeon (this module,
:mod:`qgraph.ir.files` and :mod:`qgraph.ir.structure`). Passes use the small
typed API below; a third-party pass may edit ``graph.gs`` directly.

Weights stay where they are: a model is loaded with its external data left on
disk, and each weight is read only when a pass asks for that one tensor's
values. Reading and writing the files (external data, lazy file-backed
values, streamed saves) is :mod:`qgraph.ir.files`.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from qgraph.errors import GraphCheckError, ModelLoadError, QGraphError
from qgraph.ir.defaults import add_defaults, default_constants, remove_defaults, split_defaults
from qgraph.ir.files import (
    EXTERNAL_DATA_THRESHOLD,
    attach_file_values,
    file_values,
    inline_file_values,
    read_model,
    reattach_file_values,
    write_model,
)
from qgraph.ir.stand_ins import infer_shapes_through_quantized_ops
from qgraph.ir.structure import live_nodes, onnx_checks, structure_problems, toposorted
from qgraph.ir.validate import external_refs, validate_model

log = logging.getLogger(__name__)

Node = gs.Node
Tensor = gs.Tensor
Constant = gs.Constant
Variable = gs.Variable

#: IR version given to models built from text; the newest onnxruntime reads.
DEFAULT_IR_VERSION = 10


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
        #: Graph inputs with a default (:mod:`qgraph.ir.defaults`): name -> the default, kept out of the graph.
        self.input_defaults: dict[str, Constant] = {}

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
        lost = [m.name for pending in (*before.values(), *after.values()) for m in pending]  # their anchor left earlier
        self._raw.nodes, self._dead, self._before, self._after = out, set(), {}, {}
        if lost:
            raise RuntimeError(f"nodes {lost} were added before or after a node that is no longer in the graph; add the new nodes first")

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
        model = read_model(p)
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
        plain, defaults = split_defaults(model)  # an input's default is no constant: graphsurgeon would make it one
        try:
            g = gs.import_onnx(plain)
        except Exception as e:
            raise ModelLoadError(f"the graph could not be imported ({type(e).__name__}: {e})") from None
        attach_file_values(g, externals)
        meta = {p.key: p.value for p in model.metadata_props}
        graph = cls(g, base_dir=base_dir, ir_version=model.ir_version or DEFAULT_IR_VERSION, metadata=meta)
        graph.input_defaults = default_constants(defaults, externals)
        return graph

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
        for t in [*self._gs.tensors().values(), *self.input_defaults.values()]:
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
        # The raw graph: seeding must not apply pending edits (a node added before= a removed one needs it there).
        self._used: set[str] = set(self._raw.tensors().keys()) | {n.name for n in self._raw.nodes if n.name}
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
            g.nodes = toposorted(live_nodes(g))
        self._pos = {}

    def copy(self) -> Graph:
        """An independent copy; weights are shared read-only (they are lazy)."""
        g = Graph(self._gs.copy(), base_dir=self.base_dir, ir_version=self.ir_version, metadata=self.metadata)
        g.input_defaults = dict(self.input_defaults)
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
        add_defaults(model, self.input_defaults)
        del model.metadata_props[:]
        for k, v in self.metadata.items():
            model.metadata_props.add(key=k, value=v)
        return model

    def to_proto_inline(self) -> onnx.ModelProto:
        """The ModelProto with every weight inline (for small models and ORT from bytes)."""
        model = self.to_proto()
        inline_file_values(model, file_values(self._gs, self.input_defaults.values()))
        return model

    def save(self, path: str | os.PathLike[str], *, external: bool | None = None) -> Path:
        """Write the model; weights go to ``<file>.data`` when large (or asked).

        Both files are written under temporary names and renamed when complete.
        """
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        if external is None:
            # This module's name for the threshold: export reads it from here too, and a test lowers it here.
            external = self.weights_nbytes() > EXTERNAL_DATA_THRESHOLD
        lazy = file_values(self._gs, self.input_defaults.values())
        model = self.to_proto()
        moved = write_model(model, out, lazy, external=external)
        if external:
            # The in-memory graph now reads its weights from the new file, which
            # may have replaced the old one.
            data = (out.parent / (out.name + ".data")).resolve()
            reattach_file_values(self._gs, model, moved, data, self.input_defaults.values())
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
        onnx_checks(self.to_proto(), shapes=shapes)

    def structure_problems(self) -> list[str]:
        """Problems with order, names and edges, without running the checker."""
        return structure_problems(self._gs)

    def infer_shapes(self) -> Graph:
        """Run ONNX shape inference and return the graph with shapes filled in."""
        model = self.to_proto()
        # Without the inputs' defaults: inference would propagate them as if they were the inputs' values.
        remove_defaults(model, self.input_defaults)
        try:  # ONNX's, with standard stand-ins carrying the shapes through quantized contrib ops
            inferred = infer_shapes_through_quantized_ops(model)
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
        mine = file_values(self._gs)
        for t in other._gs.tensors().values():
            if isinstance(t, gs.Constant) and t.name in mine:
                t._values = mine[t.name]
        self._gs = other._gs
        self.input_defaults = {**other.input_defaults, **self.input_defaults}  # inference drops them (infer_shapes)
        self._name_counts = collections.Counter()

    def __iter__(self) -> Iterator[Node]:
        return iter(self._gs.nodes)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {self.node_count()} nodes, {len(self._gs.inputs)} inputs, {len(self._gs.outputs)} outputs)"
