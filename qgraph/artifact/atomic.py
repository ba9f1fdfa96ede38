"""Directories and files written atomically: built under a temporary name, renamed when complete.

A killed run can leave its hidden temporary folder behind; the next run into
the same place removes such leftovers once they are old and their process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from qgraph.ir.files import process_umask

log = logging.getLogger(__name__)

#: Temporary folders older than this are left from a killed run and are removed.
STALE_TEMP_S = 3600


def _process_alive(name: str, prefix: str) -> bool:
    """True if the name says ``<prefix><pid>-...`` and that process still runs (on this machine)."""
    pid = name[len(prefix) :].split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def remove_stale_temps(folder: Path, prefixes: tuple[str, ...], max_age_s: float = STALE_TEMP_S) -> list[Path]:
    """Remove what a killed run left in ``folder``: entries named ``<prefix>*``, older than
    ``max_age_s``, whose process (when the name gives one) is gone. Returns them."""
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        prefix = next((x for x in prefixes if p.name.startswith(x)), None)
        if prefix is None or _process_alive(p.name, prefix):
            continue
        try:
            if now - p.lstat().st_mtime < max_age_s:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        except OSError:
            continue
        log.info("removed %s, left by a killed run", p)
        removed.append(p)
    return removed


def replace_dir(new: Path, dst: Path, attempts: int = 5) -> None:
    """Move a finished directory into place; an old one is swapped out, then removed.

    Another process may put its own directory at ``dst`` at the same moment
    (two compiles into one ``--artifacts`` folder): then the rename is retried,
    and the last complete directory wins.
    """
    for attempt in range(attempts):
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{attempt}")
        try:
            if dst.exists():
                os.replace(dst, old)
            os.replace(new, dst)
        except OSError:
            if attempt == attempts - 1:
                raise
            continue
        finally:
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)
        return


@contextlib.contextmanager
def building(dst: Path) -> Iterator[Path]:
    """A hidden empty folder beside ``dst`` to build it in, renamed to ``dst`` when the block completes and
    removed if it fails; what killed runs left there is removed first. The folder gets the mode an ordinary
    new folder gets (``mkdtemp`` makes it private)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dst.parent, (f".{dst.name}.tmp-", f".{dst.name}.old-"))
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent))
    try:
        tmp.chmod(0o777 & ~process_umask())
        yield tmp
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
