"""Graph inputs with a default: an initializer that shadows a graph input.

From IR version 4 on, an initializer with the name of a graph input is that
input's default value, used when the caller does not feed the input (ONNX
Runtime calls them overridable initializers). It is not a constant:
onnx-graphsurgeon imports it as one and drops the input, after which any pass
could fold it and the saved model would no longer take the input.

So the graph core imports such an input as a plain input and keeps its
default aside (:func:`split_defaults`, :func:`default_constants`): every pass
then sees a variable, and ``is this a constant`` needs no special case
anywhere. :func:`add_defaults` writes the defaults back beside their inputs
when the graph is exported. Before IR version 4 every initializer had to be
listed as an input too, and ONNX Runtime treats them as constants: so does
qgraph.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from qgraph.ir.files import file_backed
from qgraph.ir.validate import ExternalRef

#: The first IR version in which an initializer listed as an input is a default, not a constant.
DEFAULTS_IR_VERSION = 4


def split_defaults(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[TensorProto]]:
    """``model`` without the initializers that shadow a graph input, and those initializers.

    ``model`` itself is left unchanged; it is copied only when it has defaults.
    """
    if model.ir_version and model.ir_version < DEFAULTS_IR_VERSION:
        return model, []
    inputs = {vi.name for vi in model.graph.input}
    shadowing = [t for t in model.graph.initializer if t.name in inputs]
    if not shadowing:
        return model, []
    names = {t.name for t in shadowing}
    defaults = [TensorProto.FromString(t.SerializeToString()) for t in shadowing]
    kept = [t for t in model.graph.initializer if t.name not in names]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out, defaults


def default_constants(defaults: Iterable[TensorProto], externals: Mapping[str, ExternalRef]) -> dict[str, gs.Constant]:
    """Input name -> its default as a lazy constant (external data read from its checked file when asked)."""
    return {t.name: gs.Constant(t.name, file_backed(t, externals.get(t.name))) for t in defaults}


def add_defaults(model: onnx.ModelProto, defaults: Mapping[str, gs.Constant]) -> None:
    """Write the default of each graph input of ``model`` that has one back as its initializer."""
    names = {vi.name for vi in model.graph.input} & defaults.keys()
    for name in sorted(names):
        model.graph.initializer.append(OnnxExporter.export_tensor_proto(defaults[name]))


def remove_defaults(model: onnx.ModelProto, defaults: Mapping[str, gs.Constant]) -> None:
    """Drop the defaults :func:`add_defaults` wrote from ``model`` (for shape inference, which would take them as values)."""
    inits = model.graph.initializer
    for i in reversed(range(len(inits))):
        if inits[i].name in defaults:
            del inits[i]
