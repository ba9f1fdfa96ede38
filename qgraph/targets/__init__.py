"""Device targets: how each one legalizes, compiles and runs a specialization.

``cpu`` is ONNX Runtime's CPU provider, ``qnn`` the Qualcomm QNN HTP backend
from onnxruntime-qnn, ``qaic`` Cloud AI 100's compiler (its inputs and command;
the runtime is the SDK's). One module per target; :mod:`qgraph.targets.base`
holds the interface.
"""

from __future__ import annotations

from qgraph.targets.base import Target, TargetError
from qgraph.targets.cpu import CpuTarget
from qgraph.targets.qaic import QaicTarget
from qgraph.targets.qnn import QnnTarget

_TARGETS: dict[str, type[Target]] = {t.name: t for t in (CpuTarget, QnnTarget, QaicTarget)}
#: Target names, in the order the CLI lists them.
TARGETS = tuple(_TARGETS)


def get_target(name: str) -> Target:
    if name not in _TARGETS:
        raise TargetError(f"unknown target '{name}'; choose one of {', '.join(_TARGETS)}")
    return _TARGETS[name]()


__all__ = ["TARGETS", "Target", "TargetError", "get_target"]
