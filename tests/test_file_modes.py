"""Files qgraph writes get the mode the umask gives a new file (0644 under 022, 0600 under 077), as `open` would."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.ir.graph import Graph


@pytest.fixture(params=[0o022, 0o077], ids=["umask-022", "umask-077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _graph() -> Graph:
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")  # 16 KiB: goes to the weights file
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "m",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return Graph.from_proto(model)


def test_saved_graphs_honour_the_umask(tmp_path: Path, umask: int) -> None:
    g = _graph()
    inline = g.save(tmp_path / "inline.onnx", external=False)
    ext = g.save(tmp_path / "ext.onnx", external=True)
    for p in (inline, ext, tmp_path / "ext.onnx.data"):
        assert _mode(p) == 0o666 & ~umask, f"{p.name}: {oct(_mode(p))}"


def test_exports_honour_the_umask(tmp_path: Path, umask: int) -> None:
    pytest.importorskip("torch")
    from helpers import random_gpt2

    from qgraph.frontend.export import export_model

    _, model = random_gpt2(n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=32)
    out = export_model(model, tmp_path / "e" / "model.onnx", exporter="torchscript").path
    assert _mode(out) == 0o666 & ~umask
    assert _mode(out.parent) == 0o777 & ~umask  # the folder made for it, too
