"""Keeping the local cache within a size: last use, pins, holds, and LRU eviction.

- **Last use** is the modification time of an entry's ``.verified`` record, set by
  every hit with one ``utime`` (no read of the entry, no rewrite of the record).
- **Holds**: a process that got an entry holds a shared ``flock`` on ``<entry>.inuse``
  until it exits or lets go (a run holds what its stages fetched while it runs, so
  llama-server still finds its model). The kernel drops the lock when the process
  dies, however it dies: a hold never outlives its holder.
- **Pins** are files in ``<cache>/pins/<hash>.json`` (``slp task=pin``), kept across
  restarts; ``cache.keep_runs=N`` also keeps what the N newest runs used.
- **Eviction** takes an entry's own lock (no get of it in progress) and an exclusive,
  non-blocking lock on its ``.inuse`` (no holder), else leaves it; then removes the
  entry, its record and its lock files. Least recently used first, until the cache
  fits its cap.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from .artifacts import KINDS, ArtifactKind
from .errors import ConfigError
from .hashing import OID_RE

PINS = "pins"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4, "p": 1000**5,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4, "pi": 1024**5}


def parse_size(value: Any, root: str) -> int | None:
    """``cache.max_size``: None/null (no cap), bytes, ``50GB``, ``50GiB``, ``500M``, or
    ``80%`` of the filesystem holding ``root``."""
    if value in (None, "", "null", "none"):
        return None
    text = str(value).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            share = -1
        if not 0 < share <= 100:
            raise ConfigError(f"cache.max_size={value!r}: a percentage must be above 0 and at most 100")
        probe = root
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        return int(shutil.disk_usage(probe).total * share / 100)
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"cache.max_size={value!r}: expected bytes, a size such as 50GB or 500MiB, or 80%")
    unit = (m.group(2) or "").lower().rstrip("b")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class Entry:
    kind: str
    oid: str
    path: str
    size: int
    last_used: float  # epoch seconds
    name: str | None = None  # the name it was got by, when it was
    pinned: str | None = None  # why it is kept: pin | run <id> | in use

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hash"] = d.pop("oid")
        return d


def entries(root: str, names: bool = False) -> list[Entry]:
    """Every complete entry in the cache at ``root``, least recently used first
    (``names``: also read what each was called when it was got, one small read each)."""
    found = []
    for kind in KINDS.values():
        folder = os.path.join(root, kind.folder)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            if not name.endswith(kind.suffix) or not OID_RE.fullmatch(name[: -len(kind.suffix)]):
                continue
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:  # evicted meanwhile
                continue
            found.append(Entry(kind.name, name[: -len(kind.suffix)], path, st.st_size, _last_use(path, st),
                               recorded_name(path) if names else None))
    return sorted(found, key=lambda e: (e.last_used, e.oid))


def _last_use(path: str, st: os.stat_result) -> float:
    try:
        return os.stat(path + ".verified").st_mtime
    except FileNotFoundError:
        return st.st_mtime


def recorded_name(path: str) -> str | None:
    try:
        with open(path + ".verified", "rb") as f:
            return orjson.loads(f.read()).get("name")
    except (FileNotFoundError, orjson.JSONDecodeError, AttributeError):
        return None


def touch(path: str) -> None:
    """Record a use of the entry at ``path`` (best effort: a read-only cache still serves)."""
    with contextlib.suppress(OSError):
        os.utime(path + ".verified")


# -- holds --------------------------------------------------------------------


class Holds:
    """Shared locks on ``<entry>.inuse`` this process keeps until :meth:`release`."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def __del__(self) -> None:
        self.release()

    def hold(self, path: str) -> None:
        if path in self._fds:
            return
        while True:
            fd = os.open(path + ".inuse", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            # An evictor may have unlinked this .inuse while we waited for it: a lock on
            # that file guards nothing. Once the lock is on the linked file, no evictor
            # can unlink it (that takes LOCK_EX) until we let go.
            try:
                linked = os.stat(path + ".inuse").st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                linked = False
            if linked:
                self._fds[path] = fd
                return
            os.close(fd)

    def release(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def _in_use(path: str) -> bool:
    """Does any process hold the entry at ``path``? (Our own holds count too.)"""
    try:
        fd = os.open(path + ".inuse", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock we may have taken
    return False


# -- pins ---------------------------------------------------------------------


def pin_path(root: str, oid: str) -> str:
    return os.path.join(root, PINS, f"{oid}.json")


def pin(root: str, kind: ArtifactKind, oid: str, note: str | None = None) -> dict[str, Any]:
    record = {"kind": kind.name, "hash": oid, "note": note, "pinned_at": time.time()}
    os.makedirs(os.path.join(root, PINS), exist_ok=True)
    tmp = pin_path(root, oid) + f".{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(record))
    os.replace(tmp, pin_path(root, oid))
    return record


def unpin(root: str, oid: str) -> bool:
    try:
        os.unlink(pin_path(root, oid))
        return True
    except FileNotFoundError:
        return False


def pinned_hashes(root: str) -> set[str]:
    try:
        names = os.listdir(os.path.join(root, PINS))
    except FileNotFoundError:
        return set()
    return {n[:-5] for n in names if n.endswith(".json") and OID_RE.fullmatch(n[:-5])}


def run_hashes(runs_dir: str, keep_runs: int | None) -> dict[str, str]:
    """hash -> run id, for the artifacts of the ``keep_runs`` newest finished runs."""
    if not keep_runs or not os.path.isdir(runs_dir):
        return {}
    from .pipeline.run_folder import RUN_ID_RE

    ids = sorted((n for n in os.listdir(runs_dir) if RUN_ID_RE.fullmatch(n)), reverse=True)
    kept: dict[str, str] = {}
    for run_id in ids[:keep_runs]:  # run ids begin with their start time
        try:
            with open(os.path.join(runs_dir, run_id, "manifest.json"), "rb") as f:
                manifest = orjson.loads(f.read())
        except (FileNotFoundError, orjson.JSONDecodeError):
            continue
        for art in (manifest.get("artifacts") or {}).values():
            if isinstance(art, dict) and isinstance(art.get("hash"), str):
                kept.setdefault(art["hash"], run_id)
    return kept


def mark_kept(found: list[Entry], root: str, runs_dir: str | None, keep_runs: int | None) -> list[Entry]:
    pins = pinned_hashes(root)
    runs = run_hashes(runs_dir, keep_runs) if runs_dir else {}
    for e in found:
        if e.oid in pins:
            e.pinned = "pin"
        elif e.oid in runs:
            e.pinned = f"run {runs[e.oid]}"
        elif _in_use(e.path):
            e.pinned = "in use"
    return found


# -- eviction -----------------------------------------------------------------


@dataclass
class Pruned:
    cap: int | None
    total_before: int
    total_after: int
    evicted: list[Entry]
    kept_pinned: int  # bytes that could not go: pinned or in use
    dry_run: bool

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["evicted"] = [e.as_dict() for e in self.evicted]
        return d


def prune(root: str, cap: int | None, *, runs_dir: str | None = None, keep_runs: int | None = None,
          apply: bool = True, everything: bool = False, names: bool = False) -> Pruned:
    """Evict least recently used entries until the cache holds at most ``cap`` bytes
    (``everything``: every entry that is not kept). With ``apply=False``, only say which."""
    found = mark_kept(entries(root, names), root, runs_dir, keep_runs)
    total = sum(e.size for e in found)
    target = 0 if everything else cap
    evicted: list[Entry] = []
    remaining = total
    if target is not None:
        for e in found:  # least recently used first
            if remaining <= target:
                break
            if e.pinned:
                continue
            if not apply or evict(e.path):
                evicted.append(e)
                remaining -= e.size
    kept_pinned = sum(e.size for e in found if e.pinned)
    return Pruned(cap, total, remaining, evicted, kept_pinned, not apply)


def evict(path: str) -> bool:
    """Remove one entry unless a get of it is in progress or a process holds it."""
    from filelock import FileLock, Timeout  # evictions only: a hit takes no lock

    lock = FileLock(path + ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return False
    try:
        try:
            fd = os.open(path + ".inuse", os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder went with a clear
            return False
        try:
            # Held across the unlinks: a get that opened this .inuse meanwhile waits for
            # us, then finds the entry gone and fetches it again.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            if not os.path.exists(path):
                return False
            for p in (path, path + ".verified", path + ".inuse"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            return True
        finally:
            os.close(fd)
    finally:
        lock.release()
