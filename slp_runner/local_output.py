"""Writing local files that must never be left half-written: check the room first,
and turn a full disk or a refused write into one OutputError naming the path and
the bytes it needed (the caller removes its temporary file)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Iterator

from .errors import OutputError

# Errors that say "this machine cannot hold or write the file", not "the backend failed".
_LOCAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: str) -> int:
    """Free bytes on the filesystem that holds ``path`` (or would: its nearest existing parent)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return shutil.disk_usage(probe).free


def ensure_room(folder: str, needed: int, what: str) -> None:
    """Fail before writing anything when ``folder`` cannot hold ``needed`` more bytes."""
    free = free_bytes(folder)
    if needed > free:
        raise OutputError(f"no space left for {what} under {folder}: it needs {needed} bytes ({human(needed)}), "
                          f"{free} bytes ({human(free)}) free")


@contextlib.contextmanager
def local_write(path: str, needed: int | None, what: str) -> Iterator[None]:
    """Re-raise a local write failure (ENOSPC, EROFS, EACCES, ...) as one OutputError line."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        if exc.errno not in _LOCAL_WRITE_ERRNOS:
            raise
        need = f": it needs {needed} bytes ({human(needed)})" if needed is not None else ""
        reason = "no space left" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else exc.strerror
        raise OutputError(f"{reason} writing {what} to {path}{need}; nothing was kept") from None
