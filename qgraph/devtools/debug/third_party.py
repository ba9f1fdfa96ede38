"""Third-party passes: register the :class:`qgraph.Pass` subclasses a Python file defines, and make passes by name."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from qgraph.errors import PassError, UnknownPassError
from qgraph.pipeline.manager import Pass
from qgraph.pipeline.options import Options
from qgraph.pipeline.registry import build_passes, register_pass

log = logging.getLogger(__name__)


def load_pass_module(path: str | Path) -> list[type[Pass]]:
    """Import a Python file and register every :class:`qgraph.Pass` subclass it defines.

    Registered passes can be named in ``--passes`` (and :func:`build_passes`) by
    their ``name``. Classes without a ``name`` (abstract bases) and classes the
    file merely imports are skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise UnknownPassError(f"pass module {p} does not exist; give the path of a .py file that defines qgraph.Pass subclasses")
    mod_name = "qgraph_pass_module_" + hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(mod_name, p)
    if spec is None or spec.loader is None:
        raise UnknownPassError(f"pass module {p} cannot be imported; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PassError(f"pass module {p} failed to import: {type(e).__name__}: {first}") from None
    classes = [
        obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, Pass) and obj.__module__ == mod_name and obj.name
    ]
    if not classes:
        raise UnknownPassError(f"{p} defines no qgraph.Pass subclass with a name; subclass qgraph.Pass and set 'name'")
    for cls in classes:
        register_pass(cls)
        log.info("registered pass '%s' (%s) from %s", cls.name, cls.__name__, p)
    return classes


def make_passes(passes: Sequence[str | Pass] | None, opts: Options) -> list[Pass]:
    """Pass instances by name (``None``: the default pipeline) or as given."""
    if passes is None:
        return build_passes(None, opts)
    out: list[Pass] = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
            continue
        try:
            out.append(build_passes([p], opts)[0])
        except TypeError as e:
            raise UnknownPassError(f"pass '{p}' cannot be made without arguments ({e}); give its constructor defaults") from None
    return out
