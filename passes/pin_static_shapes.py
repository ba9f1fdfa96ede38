"""Pin static shapes: give every symbolic dimension its size and fold the shape math away.

Accelerator compilers want one fixed shape per compiled graph (QNN puts nearly
everything on the CPU otherwise). This pass gives the named dimensions of the
graph inputs their sizes, forgets every other shape (they name the old
symbols), runs shape inference, and folds every ``Shape`` and ``Size`` and the
arithmetic on them with :mod:`passes.folding`' sweep (repeating while
folding lets inference see more). The inferred output shapes are checked
against the sizes their declared names give, so inconsistent sizes
(``total_len != past_len + seq_len``) fail instead of producing a wrong graph.
Finally nothing symbolic may be left: every input and output dimension is a
number and no ``Shape``/``Size`` op remains. Otherwise it raises
:class:`~qgraph.errors.StaticShapeError` naming the tensors and dims. The
intermediate tensors keep the inferred (static) shapes as value_info.

Known dimension names, with the aliases Hugging Face Optimum uses:

=============  ===========================================  =====================
name           aliases                                      size
=============  ===========================================  =====================
``batch``      ``batch_size``                               ``batch_size``
``seq_len``    ``sequence_length``                          ``seq_len``
``ctx_len``                                                 ``ctx_len``
``total_len``  ``total_sequence_length``                    ``ctx_len``
``past_len``   ``past_sequence_length``                     ``ctx_len - seq_len``
=============  ===========================================  =====================

``ctx_len`` is the whole context a step attends to (cached plus new tokens),
so in a concat-grown cache graph the past holds ``ctx_len - seq_len`` tokens
and the present ``ctx_len``; without ``ctx_len`` those three need ``dims``. ``dims`` gives any other name its size and
overrides the table. A dimension written as an expression of known names
(``past_sequence_length + sequence_length``, dynamo's ``past_len + seq_len``)
is computed. A symbolic input dimension that is none of these is an error; an
output's is left to shape inference.
"""

from __future__ import annotations

import ast
import logging
import operator
from collections.abc import Mapping
from typing import Any

from passes.constants import MAX_FOLD_BYTES
from passes.folding import fold_constants
from qgraph.errors import GraphCheckError, StaticShapeError
from qgraph.ir.graph import Constant, Graph, Tensor
from qgraph.pipeline.manager import Pass, PassResult

log = logging.getLogger(__name__)

#: Aliases of the known dimension names (Optimum's names on the right).
ALIASES: dict[str, tuple[str, ...]] = {
    "batch": ("batch", "batch_size"),
    "seq_len": ("seq_len", "sequence_length"),
    "past_len": ("past_len", "past_sequence_length"),
    "total_len": ("total_len", "total_sequence_length"),
    "ctx_len": ("ctx_len",),
}
#: Rounds of shape inference + folding at most (each round can only fold more).
MAX_ROUNDS = 4

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def dim_size(dim: Any, sizes: Mapping[str, int]) -> int | None:
    """The size of one dimension: a number, a known name, or an expression of them.

    Returns None if the dimension is unknown or names something not in ``sizes``.
    """
    if isinstance(dim, int):
        return dim
    if not isinstance(dim, str) or not dim:
        return None
    if dim in sizes:
        return int(sizes[dim])
    try:
        tree = ast.parse(dim, mode="eval").body
    except SyntaxError:
        return None
    return _eval_dim(tree, sizes)


def _eval_dim(e: ast.AST, sizes: Mapping[str, int]) -> int | None:
    if isinstance(e, ast.Constant) and isinstance(e.value, int):
        return e.value
    if isinstance(e, ast.Name):
        return int(sizes[e.id]) if e.id in sizes else None
    if isinstance(e, ast.BinOp) and type(e.op) in _OPS:
        a, b = _eval_dim(e.left, sizes), _eval_dim(e.right, sizes)
        return None if a is None or b is None else int(_OPS[type(e.op)](a, b))
    return None


def _describe(shape: Any) -> str:
    return "unknown rank" if shape is None else "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


class PinStaticShapes(Pass):
    """Pin batch, seq_len and context dims (and any ``dims``) and fold shape math away.

    ``batch_size`` and ``seq_len`` are required; ``ctx_len`` (optional) is
    the total context length; ``dims`` maps any other dimension name to its
    size and overrides the built-in names. See the module docstring.
    """

    name = "pin-static-shapes"
    produces = ("static_shapes",)

    def __init__(self, batch_size: int, seq_len: int, ctx_len: int | None = None, *, dims: Mapping[str, int] | None = None) -> None:
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.ctx_len = ctx_len
        self.dims = dict(dims or {})
        self.sizes = self._sizes()

    def _sizes(self) -> dict[str, int]:
        given: dict[str, int] = {"batch": self.batch_size, "seq_len": self.seq_len}
        if self.ctx_len is not None:
            if self.ctx_len < self.seq_len:
                raise StaticShapeError(
                    f"ctx_len {self.ctx_len} is shorter than seq_len {self.seq_len}; "
                    "ctx_len counts the cached and the new tokens, so it must be at least seq_len"
                )
            given.update(ctx_len=self.ctx_len, total_len=self.ctx_len, past_len=self.ctx_len - self.seq_len)
        sizes = {alias: size for name, size in given.items() for alias in ALIASES[name]}
        for name, size in self.dims.items():
            # A known name sets its aliases too, unless dims gives an alias itself.
            for alias in ALIASES.get(name, (name,)):
                if alias == name or alias not in self.dims:
                    sizes[alias] = int(size)
        bad = {k: v for k, v in sizes.items() if v < 0}
        if bad:
            raise StaticShapeError(f"dimension sizes must not be negative: {bad}")
        return sizes

    def run(self, graph: Graph) -> PassResult:
        # By name: shape inference re-imports the graph, so tensor objects change.
        before = {t.name: list(t.shape) if t.shape is not None else None for t in graph.inputs + graph.outputs}
        self._pin_inputs(graph)
        # Outputs (and everything inside) are inferred from the pinned inputs,
        # then checked against the sizes their declared names give.
        declared = {t.name: t.shape for t in graph.outputs}
        self._forget_shapes(graph)
        stats = {"pinned_dims": 0, "folded": 0, "constant_nodes": 0}
        # Each round infers shapes and folds what became static; the last
        # inference runs after the last fold, so value_info is current.
        for round_ in range(MAX_ROUNDS + 1):
            try:
                graph.infer_shapes()
            except GraphCheckError as e:
                raise StaticShapeError(
                    f"shape inference failed on the pinned graph ({e}); check the sizes given ({self._given()})"
                ) from None
            if round_ == MAX_ROUNDS:
                break
            done = fold_constants(graph, self.name, max_bytes=MAX_FOLD_BYTES)
            stats["folded"] += done.get("folded", 0)
            stats["constant_nodes"] += done.get("constant_nodes", 0)
            if not done.get("folded"):
                break
        self._settle_outputs(graph, [declared.get(t.name) for t in graph.outputs])
        self._verify(graph)
        for t in graph.inputs + graph.outputs:
            old = before.get(t.name)
            new = list(t.shape) if t.shape is not None else None
            if old is None or new is None or len(old) != len(new):
                stats["pinned_dims"] += old != new
            else:
                stats["pinned_dims"] += sum(a != b for a, b in zip(old, new))
        stats = {k: v for k, v in stats.items() if v}
        log.info("%s: %s", self.name, stats or "already static")
        return PassResult(graph, bool(stats), stats)

    def _given(self) -> str:
        shown = {k: v for k, v in self.sizes.items() if k in ALIASES or k in self.dims}
        return ", ".join(f"{k}={v}" for k, v in shown.items())

    def _pin_inputs(self, graph: Graph) -> None:
        """Give every symbolic input dimension its size (all or nothing)."""
        problems: list[str] = []
        shapes: list[list[Any]] = []
        for t in graph.inputs:
            if t.shape is None:
                problems.append(f"input '{t.name}' has no shape")
                shapes.append([])
                continue
            new: list[Any] = []
            for axis, d in enumerate(t.shape):
                size = dim_size(d, self.sizes)
                if size is None:
                    problems.append(f"input '{t.name}' dim {axis} is symbolic ({d!r})" if d else f"input '{t.name}' dim {axis} has no size")
                new.append(size)
            shapes.append(new)
        if problems:
            raise StaticShapeError(
                "cannot pin shapes: " + "; ".join(problems) + f". Known sizes: {self._given()}; "
                "give the missing ones with dims={'<name>': size}"
            )
        for t, new in zip(graph.inputs, shapes):
            if new != list(t.shape):
                t.shape = new

    def _settle_outputs(self, graph: Graph, declared: list[Any]) -> None:
        """Check inferred output dims against the declared names; fill in what inference left open."""
        problems: list[str] = []
        for t, want in zip(graph.outputs, declared):
            if want is None:
                continue
            if t.shape is None or len(t.shape) != len(want):
                if t.shape is not None:
                    problems.append(f"output '{t.name}' has rank {len(t.shape)} after inference, but was declared {_describe(want)}")
                    continue
                t.shape = [None] * len(want)
            shape = list(t.shape)
            for axis, (got, d) in enumerate(zip(shape, want)):
                size = dim_size(d, self.sizes)
                if isinstance(got, int) and size is not None and got != size:
                    problems.append(f"output '{t.name}' dim {axis} is {got} after inference, but {d!r} = {size}")
                elif not isinstance(got, int):
                    # Inference could not tell; the declared name (or its old symbol) stands.
                    shape[axis] = size if size is not None else d
            t.shape = shape
        if problems:
            raise StaticShapeError(
                f"the sizes given ({self._given()}) do not fit the graph: "
                + "; ".join(problems)
                + ". Give sizes that agree with each other (e.g. total_len = past_len + seq_len)"
            )

    @staticmethod
    def _forget_shapes(graph: Graph) -> None:
        """Drop every shape but the inputs' (they name the old symbols); inference recomputes them."""
        inputs = {id(t) for t in graph.inputs}
        for t in graph.tensors().values():
            if not isinstance(t, Constant) and id(t) not in inputs and t.shape is not None:
                t.shape = None

    def _verify(self, graph: Graph) -> None:
        problems: list[str] = []
        for t in graph.outputs:
            problems += _symbolic_dims("output", t)
        for n in graph.nodes:
            if n.op in ("Shape", "Size"):
                x = n.inputs[0]
                what = f"{n.op} node '{n.name}'" if n.name else f"a {n.op} node"
                problems.append(f"{what} remains (its input '{x.name}' has shape {_describe(x.shape)})")
        if problems:
            shown = "; ".join(problems[:8]) + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "")
            raise StaticShapeError(
                f"the graph is not fully static after pinning ({self._given()}): {shown}. "
                "A dimension that depends on the data (or on an op shape inference does not know) "
                "cannot be pinned; give its size with dims= or rewrite that part of the graph"
            )


def _symbolic_dims(kind: str, t: Tensor) -> list[str]:
    if t.shape is None:
        return [f"{kind} '{t.name}' has unknown rank"]
    return [
        f"{t.name} dim {axis} is still symbolic ({d!r})" if d else f"{t.name} dim {axis} is unknown"
        for axis, d in enumerate(t.shape)
        if not isinstance(d, int)
    ]
