"""Writing local files that must never be left half-written: check the room first,
and turn a full disk or a refused write into one OutputError naming the path and
the bytes it needed (the caller removes its temporary file)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
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


def temp_name(folder: str, prefix: str, suffix: str = ".part") -> str:
    """A new temporary file's name in ``folder``. Unlike ``tempfile.mkstemp``, the name
    is known before the file exists: a caller that stores it first, then creates the
    file (:func:`create_temp_at`), can always remove it. A signal raised inside mkstemp,
    after the file was made but before its name came back, left the file behind."""
    import uuid

    return os.path.join(folder, f"{prefix}{uuid.uuid4().hex[:12]}{suffix}")


def keep_newest(folder: str, entry: re.Pattern, temp: re.Pattern, keep: int) -> None:
    """Bound a folder of small records (a cache of this program's own) to ``keep``
    entries: past that, the least recently written or used go, down to ``keep`` less an
    eighth, so that the next writes find room and cost one listing each. Only names
    ``entry`` matches are removed, and temporary files (``temp``) a killed write left
    over an hour ago; anything else in the folder is left alone. ``keep=0`` empties it."""
    import time

    names = os.listdir(folder)
    entries = [n for n in names if entry.fullmatch(n)]
    old = (time.time() - 3600) * 1e9
    for name in names:
        if temp.fullmatch(name):
            with contextlib.suppress(OSError):
                if os.stat(os.path.join(folder, name)).st_mtime_ns < old:
                    os.unlink(os.path.join(folder, name))
    if len(entries) <= keep:
        return
    dated = []
    for name in entries:
        with contextlib.suppress(OSError):
            dated.append((os.stat(os.path.join(folder, name)).st_mtime_ns, name))
    dated.sort()
    for _, name in dated[:max(0, len(dated) - (keep - keep // 8))]:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, name))


def create_temp_at(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
