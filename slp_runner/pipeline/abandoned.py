"""Runs left behind: staging folders whose process died before finishing (SIGKILL,
power loss, a node taken away).

A staging folder's ``.owner`` record (pid, host, start time) stays ``flock``-ed by
its process until the folder is in place (:mod:`.run_folder`). The kernel drops a
flock when its holder dies, so a lock this process can take proves the owner gone:
that folder is ``abandoned``. A held lock means ``running``. A folder owned by
another host (a shared filesystem, whose locks may not reach across machines) or
without an owner record (written by an older slp) is ``unknown``: never acted on.

    staging_runs(runs_dir)            every staging folder: running | abandoned | unknown
    find_abandoned(runs_dir)          the abandoned ones; changes nothing
    finalize_abandoned(runs_dir, id)  manifest with status abandoned, moved into runs/<id>
    remove_abandoned(runs_dir, id)    delete it; idempotent

Acting on a folder holds its lock throughout, so two cleaners never race on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import sys
from datetime import datetime, timezone
from typing import TextIO

import orjson
import yaml

from ..errors import ArtifactNotFound, ConfigError, NotAbandoned
from ..manifest import utc_now
from ..redaction import Redactor
from .run_folder import OWNER, RUN_ID_RE, make_read_only, release_owner

UTC_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # as manifest.utc_now writes it
GONE = "gone"  # the folder left .staging while we looked (its run finished): not listed


def _staging(runs_dir: str, run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        raise ConfigError(f"invalid run id {run_id!r} (expected run-YYYYMMDD-HHMMSS-xxxxxxxx)")
    return os.path.join(os.path.abspath(runs_dir), ".staging", run_id)


def _probe(folder: str) -> tuple[str, dict, int | None]:
    """(state, owner record, the descriptor holding the lock when the state is abandoned)."""
    path = os.path.join(folder, OWNER)
    try:
        with open(path, "rb") as f:
            owner = orjson.loads(f.read())
    except FileNotFoundError:
        return (GONE if not os.path.isdir(folder) else "unknown"), {"reason": "no owner record"}, None
    except (OSError, orjson.JSONDecodeError) as exc:
        return "unknown", {"reason": f"unreadable owner record ({exc})"}, None
    if owner.get("host") != socket.gethostname():
        return "unknown", {**owner, "reason": f"owned by host {owner.get('host')!r}"}, None
    try:
        fd = os.open(path, os.O_RDWR)  # NFS grants an exclusive lock only to a writer
    except FileNotFoundError:
        return GONE, owner, None
    except OSError as exc:  # another user's run, a read-only mount: cannot prove anything
        return "unknown", {**owner, "reason": f"owner record not writable ({exc.strerror})"}, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return "running", owner, None
    except OSError as exc:  # a filesystem without locks: cannot prove anything
        os.close(fd)
        return "unknown", {**owner, "reason": f"cannot lock the owner record ({exc.strerror})"}, None
    # The owner may have finished between our open and our lock: then the record we
    # locked is no longer the one at the staging path.
    try:
        here, locked = os.stat(path), os.fstat(fd)
        same = (here.st_dev, here.st_ino) == (locked.st_dev, locked.st_ino)
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return GONE, owner, None
    return "abandoned", owner, fd


def _stage_logs(folder: str, config: dict) -> dict[str, dict]:
    """Each stage with a log: completed, failed or cache hit as its log's last line
    says, else abandoned (it was running when the process died)."""
    logs = os.path.join(folder, "logs")
    names = [n[:-4] for n in sorted(os.listdir(logs)) if n.endswith(".log")] if os.path.isdir(logs) else []
    declared = list(((config.get("pipeline") or {}).get("stages") or {}))
    names = [n for n in declared if n in names] + [n for n in names if n not in declared]
    stages = {}
    for name in names:
        with open(os.path.join(logs, f"{name}.log"), "rb") as f:
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if " INFO " in ln or " ERROR " in ln]
        last = lines[-1] if lines else ""
        cache_hit = " stage cache hit " in last
        status = ("completed" if last.endswith(" INFO completed") or cache_hit
                  else "failed" if " ERROR failed: " in last else "abandoned")
        stages[name] = {"status": status, "cache_hit": cache_hit, "latency_ms": 0.0, "metrics": {},
                        "log": f"logs/{name}.log"}
    return stages


def _read_yaml(path: str) -> dict:
    with contextlib.suppress(OSError, yaml.YAMLError):
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
        return data if isinstance(data, dict) else {}
    return {}


def _row(run_id: str, folder: str, state: str, owner: dict) -> dict:
    config = _read_yaml(os.path.join(folder, "config.yaml"))
    return {
        "run_id": run_id, "status": state, "path": folder,
        "pipeline": (config.get("pipeline") or {}).get("name"),
        "pid": owner.get("pid"), "host": owner.get("host"), "start_time": owner.get("start_time") or "",
        "reason": owner.get("reason"), "stages": list(_stage_logs(folder, config)),
    }


def staging_runs(runs_dir: str) -> list[dict]:
    """Every run folder under ``runs/.staging``, with its state and owner."""
    parent = os.path.join(os.path.abspath(runs_dir), ".staging")
    rows = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        if not RUN_ID_RE.fullmatch(name):
            continue  # a folder being created or removed under a hidden name
        folder = os.path.join(parent, name)
        state, owner, fd = _probe(folder)
        if fd is not None:
            os.close(fd)
        if state != GONE:
            with contextlib.suppress(FileNotFoundError):  # it may finish while we read it
                rows.append(_row(name, folder, state, owner))
    return rows


def find_abandoned(runs_dir: str) -> list[dict]:
    """The staging folders whose owner is provably gone. Changes nothing (the lock it
    takes to prove it is let go at once)."""
    return [r for r in staging_runs(runs_dir) if r["status"] == "abandoned"]


@contextlib.contextmanager
def _holding(runs_dir: str, run_id: str):
    """The abandoned staging folder and its owner record, locked by us meanwhile;
    None when it is no longer there. NotAbandoned when its owner may be alive."""
    folder = _staging(runs_dir, run_id)
    state, owner, fd = _probe(folder)
    if state == GONE:
        yield None, owner
        return
    if state != "abandoned":
        detail = owner.get("reason") or f"pid {owner.get('pid')} is alive"
        raise NotAbandoned(f"run {run_id} is {state} ({detail}): left alone")
    try:
        yield folder, owner
    finally:
        os.close(fd)


def finalize_abandoned(runs_dir: str, run_id: str, redactor: Redactor | None = None) -> str:
    """Write a manifest with status ``abandoned`` (pipeline and start time from the
    folder, stages from the logs present) into an abandoned staging folder, move it to
    ``runs/<run_id>`` read-only, and return that path. A process that died after
    writing its own manifest keeps it, marked ``"abandoned": true``. ``redactor``
    scrubs the files first, as the dead process would have. Done already: returns the path."""
    final = os.path.join(os.path.abspath(runs_dir), run_id)
    with _holding(runs_dir, run_id) as (folder, owner):
        if folder is None:
            if os.path.exists(os.path.join(final, "manifest.json")):
                return final
            raise ArtifactNotFound(f"no staging run {run_id} in {os.path.abspath(runs_dir)}")
        config = _read_yaml(os.path.join(folder, "config.yaml"))
        stages = _stage_logs(folder, config)
        last = max((os.stat(os.path.join(root, n)).st_mtime for root, _, files in os.walk(folder) for n in files))
        overrides = []
        with contextlib.suppress(OSError, orjson.JSONDecodeError):
            with open(os.path.join(folder, "overrides.yaml"), "rb") as f:
                overrides = orjson.loads(f.read())
        manifest = {
            "run_id": run_id,
            "pipeline": (config.get("pipeline") or {}).get("name"),
            "status": "abandoned",
            "abandoned": True,
            "start_time": owner.get("start_time"),
            "end_time": None,
            "last_activity": datetime.fromtimestamp(last, timezone.utc).strftime(UTC_FORMAT),  # newest file
            "finalized_at": utc_now(),
            "total_latency_ms": None,  # unknown: files say when the run last wrote, not when it died
            "owner": {"pid": owner.get("pid"), "host": owner.get("host")},
            "artifacts": {},
            "stages": stages,
            "overrides": overrides,
        }
        own = _own_manifest(folder, run_id)
        if own:  # it died finishing (a third signal): its own record says more
            manifest = {**own, "abandoned": True, "finalized_at": manifest["finalized_at"], "owner": manifest["owner"]}
        else:
            _write_json(os.path.join(folder, "metrics.json"), {n: {} for n in stages})
        _write_json(os.path.join(folder, "manifest.json"), manifest)
        if redactor is not None:
            redactor.scrub_folder(folder)
        os.rename(folder, final)
        release_owner(final, None)  # our lock goes when _holding closes it
        make_read_only(final)
    return final


def _own_manifest(folder: str, run_id: str) -> dict | None:
    """The manifest the dead process wrote itself, if it got that far."""
    with contextlib.suppress(OSError, orjson.JSONDecodeError):
        with open(os.path.join(folder, "manifest.json"), "rb") as f:
            m = orjson.loads(f.read())
        if isinstance(m, dict) and m.get("run_id") == run_id and m.get("status"):
            return m
    return None


def _write_json(path: str, obj) -> None:
    with open(path, "wb") as f:
        f.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")


def remove_abandoned(runs_dir: str, run_id: str) -> bool:
    """Delete an abandoned staging folder; True if it was there, False if there was
    nothing to remove (so calling it twice is fine). Moved out of sight under a
    hidden name first, so a removal cut short never leaves half a run listed."""
    parent = os.path.dirname(_staging(runs_dir, run_id))
    trash = os.path.join(parent, f".{run_id}.removing")
    leftover = os.path.isdir(trash)
    if leftover:  # an earlier removal cut short: finish it
        shutil.rmtree(trash)
    with _holding(runs_dir, run_id) as (folder, _):
        if folder is None:
            return leftover
        os.rename(folder, trash)
        shutil.rmtree(trash)
    return True


def settle_abandoned(runs_dir: str, op: str, run_id: str | None = None, redactor: Redactor | None = None,
                     out: TextIO = sys.stdout) -> list[str]:
    """``slp task=runs op=finalize|clean [run=<id>]``: finalize or remove the given
    abandoned run, or every one; say what was done and what was left alone."""
    if op not in ("finalize", "clean"):
        raise ConfigError(f"unknown op {op!r} for task=runs (choose from finalize, clean)")
    ids = [run_id] if run_id else [r["run_id"] for r in find_abandoned(runs_dir)]
    done = []
    for rid in ids:
        if op == "finalize":
            print(f"finalized {rid} as abandoned: {finalize_abandoned(runs_dir, rid, redactor)}", file=out)
        elif remove_abandoned(runs_dir, rid):
            print(f"removed abandoned {rid}", file=out)
        else:
            print(f"{rid}: not in .staging, nothing to remove", file=out)
        done.append(rid)
    if not ids:
        print(f"no abandoned runs in {os.path.join(os.path.abspath(runs_dir), '.staging')}", file=out)
    for r in staging_runs(runs_dir) if not run_id else []:
        if r["status"] == "unknown":
            print(f"left alone {r['run_id']}: owner unknown ({r['reason']})", file=out)
    return done
