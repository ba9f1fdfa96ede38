"""Where a file named by a file may be: inside the folder that names it.

Model files name their weights (external data, a safetensors index's
``weight_map``) and artifacts name their graphs and weights (the manifest). A
name from such a file is a relative path that stays in its folder: no absolute
path (POSIX or Windows), no ``..``, and, where links are followed, no symlink
that leads out. One rule, written here; each caller says what to do in its own
words.
"""

from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Any


class Escape(Enum):
    """Why a name does not stay in its folder."""

    NOT_A_NAME = "not a file name"
    ABSOLUTE = "an absolute path"
    DOTDOT = "climbs out with '..'"
    UNRESOLVABLE = "cannot be resolved"
    LINKS_OUT = "leads outside through a link"


class EscapeError(ValueError):
    """A name that does not stay in its folder: ``kind`` says how, ``detail`` gives the error or where a link leads.

    Callers turn it into their own one-line error; it never reaches a user as is.
    """

    def __init__(self, kind: Escape, detail: str) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail


def inside(folder: Path, name: Any, *, follow_links: bool = True) -> Path:
    """The path ``name`` gives inside ``folder`` (resolved when ``follow_links``), or :class:`EscapeError`.

    ``follow_links=False`` checks the name only (a Hugging Face cache snapshot's files are links into its blob store).
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise EscapeError(Escape.NOT_A_NAME, repr(name))
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise EscapeError(Escape.ABSOLUTE, name)
    if ".." in Path(name.replace("\\", "/")).parts:
        raise EscapeError(Escape.DOTDOT, name)
    if not follow_links:
        return folder / name
    try:
        base = folder.resolve()
        path = (base / name).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a name too long
        raise EscapeError(Escape.UNRESOLVABLE, str(e)) from None
    if base != path and base not in path.parents:
        raise EscapeError(Escape.LINKS_OUT, str(path))
    return path
