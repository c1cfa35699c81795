"""Looking back at runs: find a run folder, list and filter runs (a page at a time),
verify a run's artifacts, and compare a reproduction with its original."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta, timezone
from datetime import time as dtime
from typing import Any, TextIO

import orjson

from ..artifacts import kind_named
from ..cache import LocalCache
from ..errors import ArtifactNotFound, ConfigError
from ..fsck import parse_grace
from ..hashing import hash_file
from ..store import ArtifactStore, backend_errors
from .abandoned import staging_runs
from .run_folder import RUN_ID_RE


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        raise ConfigError(f"invalid run id {run_id!r} (expected run-YYYYMMDD-HHMMSS-xxxxxxxx)")
    return run_id


def load_run_file(run_id: str, rel: str, runs_dir: str, store: ArtifactStore | None) -> bytes:
    """A file of a run folder: from ``runs_dir`` on this machine, else from the backend."""
    _check_run_id(run_id)
    local = os.path.join(runs_dir, run_id, rel)
    if os.path.exists(local):
        with open(local, "rb") as f:
            return f.read()
    if store is not None:
        path = store.backend.path("runs", run_id, rel)
        with backend_errors(store.backend, f"reading {path}"):
            try:
                return store.fs.cat_file(path)
            except FileNotFoundError:
                pass
    raise ArtifactNotFound(f"no run {run_id} in {os.path.abspath(runs_dir)}"
                           + (f" nor in {store.backend.name} backend at {store.backend.location}" if store else ""))


def load_manifest(run_id: str, runs_dir: str, store: ArtifactStore | None) -> dict:
    return orjson.loads(load_run_file(run_id, "manifest.json", runs_dir, store))


STATUSES = ("completed", "failed", "interrupted", "abandoned", "running", "unknown")
_DURATION_RE = re.compile(r"\d+(\.\d*)?\s*[smhd]?")


def _when(key: str, value: Any, now: datetime) -> datetime | None:
    """``since``/``until`` as an aware UTC datetime: an ISO date or time (naive ones are
    UTC, as run ids and manifests are), or a duration meaning that long ago. A bare
    date given as ``until`` means the end of that day, so ``until=2026-11-27`` keeps it."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, date):
        when = datetime.combine(value, dtime.max if key == "until" else dtime.min)
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool) \
            and _DURATION_RE.fullmatch(str(value).strip().lower()):
        return now - timedelta(seconds=parse_grace(value))
    else:
        text = str(value).strip()
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected an ISO date or time (2026-11-27, 2026-11-27T10:00) "
                              "or a duration ago (30m, 24h, 7d)") from None
        if key == "until" and len(text) == 10:  # a date alone
            when = datetime.combine(when.date(), dtime.max)
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _names(key: str, value: Any, allowed: tuple[str, ...] | None = None) -> set[str] | None:
    """One name or a comma list (``failed,interrupted``); None when not filtering."""
    if value is None or value == "":
        return None
    if isinstance(value, Mapping):  # a composed pipeline group (pipeline=<name> on the command line)
        value = value.get("name")
    items = value if isinstance(value, Sequence) and not isinstance(value, str) else str(value).split(",")
    names = {str(v).strip() for v in items} - {""}
    bad = sorted(names - set(allowed)) if allowed else []
    if not names or bad:
        expected = f"one or more of {', '.join(allowed)}" if allowed else "a name"
        raise ConfigError(f"{key}={value!r}: expected {expected}, comma-separated")
    return names


def _positive(key: str, value: Any) -> int:
    try:  # 3 or "3"; not 2.5, True or "abc"
        n = 0 if isinstance(value, bool) else int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{key}={value!r}: expected a whole number, 1 or more")
    return n


def _id_time(run_id: str) -> datetime:
    """When a run started, to the second: its id says so (``run-YYYYMMDD-HHMMSS-...``, UTC)."""
    return datetime.strptime(run_id[4:19], "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)


def recorded_overrides(data: Any) -> list[str]:
    """The recorded overrides, minus the ``# reproduces <id>`` note (the row's
    ``reproduces`` says it)."""
    return [str(o) for o in data if not str(o).startswith("#")] if isinstance(data, list) else []


def _read_manifest(folder: str) -> dict:
    with open(os.path.join(folder, "manifest.json"), "rb") as f:
        return orjson.loads(f.read())


def _finished_row(runs_dir: str, name: str) -> dict:
    folder = os.path.join(os.path.abspath(runs_dir), name)
    try:
        m = _read_manifest(folder)
    except (OSError, orjson.JSONDecodeError) as exc:  # listed, not fatal: the user sees which one
        m = {"status": "unreadable", "error": str(exc)}
    stages = m.get("stages") or {}
    return {
        "run_id": name, "status": m.get("status"), "pipeline": m.get("pipeline"),
        "start_time": m.get("start_time") or "", "total_latency_ms": m.get("total_latency_ms"),
        "stages": len(stages), "cache_hits": sum(1 for s in stages.values() if s.get("cache_hit")),
        "reproduces": m.get("reproduces"), "overrides": recorded_overrides(m.get("overrides")), "folder": folder,
    }


def _with_overrides(row: dict) -> dict:
    """overrides.yaml (a JSON list, secrets masked) is what the run recorded; read only
    for the rows shown. The manifest's copy stands in when the file cannot be read."""
    with contextlib.suppress(OSError, orjson.JSONDecodeError):
        with open(os.path.join(row["folder"], "overrides.yaml"), "rb") as f:
            row["overrides"] = recorded_overrides(orjson.loads(f.read()))
    return row


def _staging_row(r: dict) -> dict:
    return {"run_id": r["run_id"], "status": r["status"], "pipeline": r["pipeline"],
            "start_time": r["start_time"], "total_latency_ms": None, "stages": len(r["stages"]),
            "cache_hits": 0, "reproduces": None, "overrides": [], "folder": r["path"], "staging": True,
            "pid": r["pid"], "host": r["host"], "reason": r["reason"]}


def find_runs(runs_dir: str, *, pipeline: Any = None, status: Any = None, since: Any = None, until: Any = None,
              limit: int = 20, page: int = 1) -> dict:
    """The runs in ``runs_dir`` that match, one page of them, newest first.

    Folders still in ``runs/.staging`` (running, abandoned, unknown) come first, then
    finished runs: they are the ones in progress or needing ``op=finalize|clean``, and
    there are few of them. ``since``/``until`` compare the time in the run id (the
    second the run started, UTC). ``pipeline`` and ``status`` take a name or a comma list.

    Returns ``{"runs", "total", "page", "pages", "limit", "runs_dir", "filters", "abandoned"}``:
    ``total`` and ``pages`` count every match; a page past the last has no runs;
    ``abandoned`` counts the abandoned staging runs, matching or not.
    """
    limit, page = _positive("limit", limit), _positive("page", page)
    now = datetime.now(timezone.utc)
    lo_t, hi_t = _when("since", since, now), _when("until", until, now)
    if lo_t and hi_t and lo_t > hi_t:
        raise ConfigError(f"since={since!r} is after until={until!r}")
    pipelines, statuses = _names("pipeline", pipeline), _names("status", status, STATUSES)

    def in_window(run_id: str) -> bool:
        t = _id_time(run_id)
        return (lo_t is None or t >= lo_t.replace(microsecond=0)) and (hi_t is None or t <= hi_t)

    def matches(row: dict) -> bool:
        return (pipelines is None or row["pipeline"] in pipelines) and (statuses is None or row["status"] in statuses)

    staging = [_staging_row(r) for r in staging_runs(runs_dir)]
    abandoned = sum(r["status"] == "abandoned" for r in staging)
    staging = sorted((r for r in staging if in_window(r["run_id"]) and matches(r)),
                     key=lambda r: (r["run_id"][:19], r["start_time"]), reverse=True)
    # Finished runs, newest first by the id's timestamp, known without opening a file: the
    # date window and (without pipeline/status filters) the page are chosen from names
    # alone, so only the manifests shown are read. Ids of one second are ordered by their
    # manifests' start_time, so a page boundary reads its whole second.
    names = sorted((n for n in (os.listdir(runs_dir) if os.path.isdir(runs_dir) else [])
                    if RUN_ID_RE.fullmatch(n) and in_window(n)
                    and os.path.exists(os.path.join(runs_dir, n, "manifest.json"))), reverse=True)
    lo, hi = (page - 1) * limit, page * limit
    if pipelines is None and statuses is None:
        total = len(staging) + len(names)
        finished = _page_by_second(runs_dir, names, max(lo - len(staging), 0), max(hi - len(staging), 0))
    else:  # matching needs each manifest in the window
        rows = [r for r in (_finished_row(runs_dir, n) for n in names) if matches(r)]
        rows.sort(key=lambda r: (r["run_id"][:19], r["start_time"]), reverse=True)
        total = len(staging) + len(rows)
        finished = rows[max(lo - len(staging), 0):max(hi - len(staging), 0)]
    filters = {k: v for k, v in (("pipeline", pipelines and ",".join(sorted(pipelines))),
                                 ("status", statuses and ",".join(sorted(statuses))),
                                 ("since", since), ("until", until)) if v not in (None, "")}
    return {"runs": staging[lo:hi] + [_with_overrides(r) for r in finished], "total": total, "page": page,
            "pages": -(-total // limit), "limit": limit, "runs_dir": os.path.abspath(runs_dir),
            "filters": filters, "abandoned": abandoned}


def _page_by_second(runs_dir: str, names: list[str], lo: int, hi: int) -> list[dict]:
    """Rows ``lo:hi`` of ``names`` (newest first), reading only the seconds they span."""
    out, pos = [], 0
    for _, group in itertools.groupby(names, key=lambda n: n[:19]):
        group = list(group)
        if pos >= hi:
            break
        if pos + len(group) > lo:
            rows = sorted((_finished_row(runs_dir, n) for n in group), key=lambda r: r["start_time"], reverse=True)
            out += rows[max(lo - pos, 0):hi - pos]
        pos += len(group)
    return out


def print_runs(result: dict, out: TextIO = sys.stdout) -> None:
    """The table of :func:`find_runs`: one line a run, its overrides indented below."""
    for r in result["runs"]:
        if r.get("staging"):
            owner = f"pid {r['pid']} on {r['host']}" if r["pid"] else r["reason"]
            print(f"{r['run_id']}  {r['status']:<11} {r['pipeline'] or '-':<20} {'-':>8}  {r['stages']:>3} stages "
                  f"in .staging ({owner})", file=out)
        else:
            latency = "-" if r["total_latency_ms"] is None else f"{r['total_latency_ms'] / 1000:.2f}s"
            extra = f" reproduces {r['reproduces']}" if r["reproduces"] else ""
            print(f"{r['run_id']}  {r['status'] or '-':<11} {r['pipeline'] or '-':<20} {latency:>9} "
                  f"{r['stages']:>3} stages {r['cache_hits']:>3} cached{extra}", file=out)
        if r["overrides"]:
            print(f"    {' '.join(shlex.quote(o) for o in r['overrides'])}", file=out)
    total, page, pages = result["total"], result["page"], result["pages"]
    if pages > 1 or (total and page > pages):
        more = f": page={page + 1} for more" if page < pages else ""
        print(f"page {page} of {pages} ({total} runs){more}", file=out)
    if result["abandoned"]:
        print("abandoned runs: `slp task=runs op=finalize` keeps them as runs, `op=clean` deletes them", file=out)
    if not total:
        filters = " ".join(f"{k}={v}" for k, v in result["filters"].items())
        print(f"no runs match {filters} in {result['runs_dir']}" if filters else f"no runs in {result['runs_dir']}",
              file=out)


def list_runs(runs_dir: str, limit: int = 20, out: TextIO = sys.stdout) -> list[dict]:
    """The newest ``limit`` runs (staging folders first), printed; the rows shown."""
    result = find_runs(runs_dir, limit=limit)
    print_runs(result, out)
    return result["runs"]


def verify_run(manifest: dict, store: ArtifactStore, cache: LocalCache, out: TextIO = sys.stdout) -> list[dict]:
    """Re-hash every artifact a run references, in the backend and in the local cache."""
    problems = []
    for name, art in manifest.get("artifacts", {}).items():
        kind, oid = kind_named(art["kind"]), art["hash"]
        check = store.verify(kind, oid)
        print(f"{'OK' if check.ok else 'FAILED':6} backend {name} {oid} {check.detail}", file=out)
        if not check.ok:
            problems.append({"artifact": name, "where": "backend", "detail": check.detail})
        local = cache.path_for(kind, oid)
        if os.path.exists(local):
            got = hash_file(local).blake3
            ok = got == oid
            print(f"{'OK' if ok else 'FAILED':6} cache   {name} {oid} {'ok' if ok else 'corrupt: ' + got}", file=out)
            if not ok:
                problems.append({"artifact": name, "where": "cache", "detail": f"hashes to {got}"})
    return problems


def compare_runs(original: dict, reproduction: dict, out: TextIO = sys.stdout) -> dict[str, bool]:
    """Per output artifact of the original: does the reproduction have the same hash?"""
    result = {}
    new = reproduction.get("artifacts", {})
    for name, art in original.get("artifacts", {}).items():
        other = new.get(name, {}).get("hash")
        same = other == art["hash"]
        result[name] = same
        print(f"{'SAME' if same else 'DIFFERENT':9} {name} {art['hash']}"
              + ("" if same else f" -> {other or 'missing'}"), file=out)
    return result
