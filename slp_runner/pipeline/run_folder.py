"""Immutable run folders, laid out as the seed's ``runs/<run_id>/``::

    runs/<run_id>/
      manifest.json      run id, status, times, every artifact and stage, system info
      config.yaml        the resolved config (every secret as ***)
      overrides.yaml     the command-line overrides (likewise)
      metrics.json       every stage's metrics
      logs/<stage>.log   one log per stage
      stages/<stage>/    files a stage wrote (results.jsonl, ...)

A run is written under ``runs/.staging/<run_id>``, scrubbed of every secret the
process knows (see :mod:`slp_runner.redaction`), renamed into place whole, then made
read-only: a folder under ``runs/`` is never half-written nor rewritten.
The finished folder is then copied to the backend under ``runs/<run_id>/``, the
manifest last, so a manifest in the backend means the whole folder is there.

While it is written, the staging folder holds ``.owner`` (pid, host, start time),
``flock``-ed by the writing process until the folder is in place: the kernel drops
the lock when that process dies however it dies, which is how
:mod:`slp_runner.pipeline.abandoned` tells a run in progress from one left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import stat
import time
from datetime import datetime, timezone

import blake3
import orjson

from ..client import command_pid
from ..manifest import utc_now
from ..redaction import Redactor
from ..store import ArtifactStore

RUN_ID_RE = re.compile(r"run-\d{8}-\d{6}-[0-9a-f]{8}")
OWNER = ".owner"  # the owner record of a staging folder; never part of a finished run


def new_run_id(content: bytes) -> str:
    """``run-YYYYMMDD-HHMMSS-<8 hex>``: the hex mixes the config with time, pid and
    randomness, so parallel multirun jobs started in the same second differ."""
    now = datetime.now(timezone.utc)
    salt = f"{time.time_ns()}:{os.getpid()}".encode() + os.urandom(8)
    return f"run-{now:%Y%m%d-%H%M%S}-{blake3.blake3(content + salt).hexdigest()[:8]}"


class RunFolder:
    def __init__(self, runs_dir: str, run_id: str):
        self.runs_dir = os.path.abspath(runs_dir)
        self.run_id = run_id
        self.staging = os.path.join(self.runs_dir, ".staging", run_id)
        self.final = os.path.join(self.runs_dir, run_id)
        self._owner_fd: int | None = claim_staging(self.staging, run_id)

    @property
    def path(self) -> str:
        return self.staging if os.path.isdir(self.staging) else self.final

    def write_bytes(self, rel: str, data: bytes) -> str:
        target = os.path.join(self.staging, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
        return target

    def write_json(self, rel: str, obj) -> str:
        return self.write_bytes(rel, orjson.dumps(obj, option=orjson.OPT_INDENT_2, default=str) + b"\n")

    def finalize(self, redactor: Redactor | None = None) -> str:
        """Scrub the finished folder of secrets, move it into place in one rename, then
        make it read-only (so the scrub must come first)."""
        if redactor is not None:
            redactor.scrub_folder(self.staging)
        os.rename(self.staging, self.final)
        release_owner(self.final, self._owner_fd)  # held until the folder is out of .staging
        self._owner_fd = None
        make_read_only(self.final)
        return self.final

    def files(self) -> list[str]:
        out = []
        for root, _, files in os.walk(self.final):
            out += [os.path.relpath(os.path.join(root, f), self.final) for f in files]
        return sorted(out, key=lambda rel: (rel == "manifest.json", rel))  # manifest last

    def upload(self, store: ArtifactStore) -> int:
        count = 0
        for rel in self.files():
            with open(os.path.join(self.final, rel), "rb") as f:
                store.put_bytes(f.read(), f"runs/{self.run_id}/{rel}")
            count += 1
        return count


def make_read_only(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            os.chmod(p, stat.S_IMODE(os.stat(p).st_mode) & ~0o222)


def claim_staging(staging: str, run_id: str) -> int:
    """Create the staging folder with its owner record already locked; return the
    locked descriptor, to keep open until the folder is finalized.

    Built under a hidden name and renamed into place, so no staging folder is ever
    seen without a locked owner record.
    """
    tmp = os.path.join(os.path.dirname(staging), f".{run_id}.{os.getpid()}.new")
    os.makedirs(tmp)
    fd = os.open(os.path.join(tmp, OWNER), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, orjson.dumps({"run_id": run_id, "pid": command_pid(), "host": socket.gethostname(),
                                   "start_time": utc_now()}) + b"\n")
        os.rename(tmp, staging)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(tmp, OWNER))
            os.rmdir(tmp)
        raise
    return fd


def release_owner(folder: str, fd: int | None) -> None:
    """Drop the owner record of a folder that has left ``.staging``. A reader that
    opened the record before the rename gets the lock now, but finds no record at the
    staging path any more, so it never takes a finished run for an abandoned one."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, OWNER))
    if fd is not None:
        os.close(fd)
