"""Golden graphs: a canonical ONNX text form, and compare-or-update.

The canonical form is stable under the things that do not matter to a rewrite:
node names, intermediate tensor names, value_info, and weight values. Nodes are
printed in a deterministic topological order; intermediate tensors are renamed
``t0, t1, ...`` in order of definition; constants are renamed ``c0, c1, ...``
in order of first use. Small constants (at most ``MAX_INLINE`` elements) keep
their values, because a rewrite's epsilon or exponent is part of what it did;
larger ones become typed graph inputs, so the text still parses and runs.
"""

from __future__ import annotations

import difflib
import heapq
from pathlib import Path

import onnx
from onnx import helper

from qgraph.ir.graph import Graph

MAX_INLINE = 16


def proto_toposort(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Kahn's algorithm with ties broken by original position (deterministic)."""
    produced_by: dict[str, int] = {}
    for i, n in enumerate(graph.node):
        for o in n.output:
            if o:
                produced_by[o] = i
    deps: list[set[int]] = []
    users: dict[int, list[int]] = {i: [] for i in range(len(graph.node))}
    for i, n in enumerate(graph.node):
        d = {produced_by[x] for x in n.input if x in produced_by and produced_by[x] != i}
        deps.append(d)
        for j in d:
            users[j].append(i)
    ready = [i for i, d in enumerate(deps) if not d]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            deps[u].discard(i)
            if not deps[u]:
                heapq.heappush(ready, u)
    if len(order) != len(graph.node):  # a cycle: keep the rest in file order
        order += [i for i in range(len(graph.node)) if i not in set(order)]
    return [graph.node[i] for i in order]


def canonical_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A canonical copy of ``model`` (see the module docstring)."""
    src = model.graph
    keep = {v.name for v in src.input} | {v.name for v in src.output}
    inits = {t.name: t for t in src.initializer}
    rename: dict[str, str] = {"": ""}
    n_t = n_c = 0
    for name in keep:
        rename[name] = name
    nodes = proto_toposort(src)
    for n in nodes:
        for x in n.input:
            if x not in rename and x in inits:
                rename[x] = f"c{n_c}"
                n_c += 1
        for o in n.output:
            if o not in rename:
                rename[o] = f"t{n_t}"
                n_t += 1
    g = onnx.GraphProto(name=src.name or "g")
    g.input.extend(src.input)
    big_inputs = []
    small_inits = []
    for name, t in inits.items():
        if name in keep or name not in rename:
            continue
        t2 = onnx.TensorProto()
        t2.CopyFrom(t)
        t2.name = rename[name]
        if t.data_location == onnx.TensorProto.EXTERNAL or _numel(t) > MAX_INLINE:
            big_inputs.append(helper.make_tensor_value_info(t2.name, t.data_type, list(t.dims)))
        else:
            small_inits.append(t2)
    g.input.extend(sorted(big_inputs, key=lambda v: int(v.name[1:])))
    g.initializer.extend(sorted(small_inits, key=lambda t: int(t.name[1:])))
    g.output.extend(src.output)
    for n in nodes:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.name = ""
        m.ClearField("doc_string")
        m.input[:] = [rename.get(x, x) for x in n.input]
        m.output[:] = [rename.get(x, x) for x in n.output]
        attrs = sorted(m.attribute, key=lambda a: a.name)
        del m.attribute[:]
        m.attribute.extend(attrs)
        g.node.append(m)
    out = helper.make_model(g, opset_imports=sorted(model.opset_import, key=lambda o: o.domain))
    out.ir_version = model.ir_version
    return out


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def canonical_text(graph: Graph | onnx.ModelProto) -> str:
    """The canonical ONNX text of a graph or model."""
    model = graph.to_proto() if isinstance(graph, Graph) else graph
    return onnx.printer.to_text(canonical_model(model)).rstrip() + "\n"


class GoldenMismatch(AssertionError):
    """The graph differs from its golden file."""


def compare_or_update(actual: Graph | onnx.ModelProto | str, path: str | Path, *, update: bool) -> bool:
    """Compare with the golden file at ``path``, or rewrite it when ``update``.

    Returns True when the file was (re)written. Raises :class:`GoldenMismatch`
    with a unified diff when the texts differ, or when the file is missing.
    """
    p = Path(path)
    text = actual if isinstance(actual, str) else canonical_text(actual)
    if update:
        if p.is_file() and p.read_text() == text:
            return False
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return True
    if not p.is_file():
        raise GoldenMismatch(f"golden file {p} does not exist; run pytest --update-golden to create it, then review it")
    expected = p.read_text()
    if expected != text:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(p), "actual"))
        raise GoldenMismatch(f"graph differs from {p} (pytest --update-golden rewrites it):\n{diff}")
    return False
