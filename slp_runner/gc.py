"""``slp task=gc``: delete the stored objects nothing refers to any more.

Mark, then sweep, on any backend:

- **Mark** (complete before anything is deleted). The roots are

  - every run manifest, in the local ``runs_dir`` and in the backend's ``runs/``
    (one union by run id; the local copy is read when there is one): all runs, or
    the ``keep_runs`` newest, or those started since ``keep_since``; both given keep
    the runs either selects (a union, as restic's ``--keep-last`` and
    ``--keep-within`` combine). A run counts whatever its status. Every full BLAKE3
    hash a kept manifest mentions (its artifacts, stage inputs and outputs, the
    references it resolved) is marked;
  - every name in ``refs/`` (names are roots, like git branches);
  - each ``keep`` entry: a full hash, a unique prefix of 8+ hex digits or
    ``name[:tag]`` (an entry that names nothing stored is an error).

  A run manifest or a name that cannot be read stops the gc with one line naming
  it, before anything is deleted: a sweep never follows an incomplete mark.

- **Sweep** ``models/``, ``prompts/``, ``results/`` and ``blobs/``: an object not
  marked is deleted, then its manifest, when both are older than ``grace`` (the
  newer of the two times counts: a put deduplicated against an object may refresh
  only its manifest). Just before each deletion the object's and its manifest's
  times are read again (one ``info`` each), and an object refreshed meanwhile is
  kept. A gc stopped half-way leaves at most a manifest without its object, which
  the next gc (or ``fsck fix=true``) removes; never an object without a manifest.
  Manifests whose object is gone are swept the same way. Nothing under
  ``.incoming/``, ``refs/`` or ``runs/`` is touched.

- **Stage cache**: records (``stage-cache/<key>.json``) whose outputs name a swept
  object are deleted with it, so the stage runs again next time. (A record whose
  object is gone is a miss anyway, see ``outputs_still_exist``: dropping it keeps
  the stage cache from holding dead records.)

Dry run by default: it lists what would go and how many bytes that frees;
``apply=True`` deletes.

Races. The kind folders are listed before the roots are read, so a run or name
published before that read is seen, and an object put after the listing is never
a candidate. What the grace period and the re-check cannot see is an old,
unreferenced object that something starts to use while gc runs without writing
anything to it: a put that deduplicates against it, or a stage-cache hit on it.
Those must publish its manifest again (a new time) and then check that the object
is still there; the re-check then keeps it (``store.put`` and the stage cache do not
do so yet: tests/test_gc.py marks the two cases xfail). The window left after that
is one re-check-to-delete interval (milliseconds) per object.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, TextIO

import orjson

from .artifacts import KINDS, ArtifactKind
from .errors import BackendError, ConfigError, IntegrityError
from .local_output import human
from .store import ArtifactStore, backend_errors

MANIFEST_SUFFIX = ".manifest.json"
STAGE_CACHE = "stage-cache"
RUNS = "runs"
SHOWN = 20  # swept objects listed one a line; beyond, a count
_OID = re.compile(r"[0-9a-f]{64}")
_HASHES = re.compile(rb"(?<![0-9a-fA-F])[0-9a-f]{64}(?![0-9a-fA-F])")


@dataclass
class _Stored:
    """One hash in one kind folder: its object and manifest listing entries (None: absent)."""

    kind: ArtifactKind
    oid: str
    obj: dict | None = None
    manifest: dict | None = None

    @property
    def size(self) -> int:
        return int(self.obj.get("size") or 0) if self.obj else 0

    @property
    def manifest_size(self) -> int:
        return int(self.manifest.get("size") or 0) if self.manifest else 0


class _Counter:
    """Backend calls this gc made (one per listing, file read, info, delete); thread-safe."""

    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def add(self, k: int = 1) -> None:
        with self._lock:
            self.n += k


@dataclass
class _Run:
    run_id: str
    where: str  # the path it was read from
    data: bytes
    start_time: str = ""
    manifest: dict = field(default_factory=dict)


def collect_garbage(store: ArtifactStore, *, runs_dir: str, keep_runs: int | None = None,
                    keep_since: str | None = None, keep: Iterable[str] | str = (), grace: float = 86400.0,
                    apply: bool = False, workers: int = 8, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Mark what the kept runs, the names and ``keep`` refer to; sweep the rest of the
    kind folders (see the module docstring). Returns a JSON-ready report::

        {"dry_run", "runs_kept", "roots": {"runs", "names", "kept"}, "marked",
         "swept": [{"kind", "hash", "size", "modified", "what"}], "young", "refreshed",
         "freed_bytes", "stage_cache_dropped", "missing_referenced", "requests", "seconds"}

    ``swept`` lists what was deleted (a dry run: what would be); ``what`` is
    ``object`` or ``orphan-manifest``; ``size`` is the object's bytes and
    ``freed_bytes`` counts manifests too. ``young``: unreferenced, but inside the grace
    period; ``refreshed``: unreferenced and old when listed, but refreshed before it
    could be deleted. ``requests`` counts the backend calls gc made itself.

    ``workers``: objects re-checked and deleted at once (each one's steps stay in
    order). A backend failure while sweeping stops it and raises BackendError (one
    line saying what was already deleted); the partial report is its ``report``.
    """
    t0 = time.monotonic()
    gc = _Gc(store, runs_dir, grace, apply, out, workers)
    keep_list = _keep_list(keep)
    keep_runs = _keep_runs(keep_runs)
    since = _since(keep_since)
    # Listings served from a client-side cache (s3fs keeps one) would hide a put.
    store.fs.invalidate_cache()
    with backend_errors(store.backend, "marking what is in use"):
        # Objects first, roots after: a root published before its read is seen, and an
        # object put after the listing is no candidate at all.
        stored = gc.list_stored()
        runs = gc.read_runs()
        kept_runs = _select_runs(runs, keep_runs, since)
        names = gc.read_names()
    marked: set[str] = set()
    for run in kept_runs:
        marked.update(h.decode() for h in _HASHES.findall(run.data))
    marked.update(r["hash"] for r in names)
    kept_hashes = gc.resolve_keep(keep_list, stored)
    marked.update(kept_hashes)

    report: dict[str, Any] = {
        "dry_run": not apply,
        "runs_kept": sorted(r.run_id for r in kept_runs),
        "roots": {"runs": len(kept_runs), "names": len(names), "kept": len(keep_list)},
        "marked": 0, "swept": [], "young": 0, "refreshed": 0, "freed_bytes": 0, "stage_cache_dropped": 0,
        "missing_referenced": 0, "requests": 0, "seconds": 0.0,
    }
    candidates: list[_Stored] = []
    kept = 0
    for entry in stored:
        if entry.oid in marked:
            kept += 1
            if entry.obj is None:
                report["missing_referenced"] += 1
            continue
        if gc.age(entry) > grace:
            candidates.append(entry)
        else:
            report["young"] += 1
    report["marked"] = kept

    try:
        swept = gc.sweep(candidates, report)
        report["stage_cache_dropped"] = gc.drop_stage_cache({e.oid for e in swept})
    except BackendError as exc:
        report["error"] = str(exc)
        report["requests"], report["seconds"] = gc.calls.n, round(time.monotonic() - t0, 3)
        freed = sum(s["size"] for s in report["swept"])
        stopped = BackendError(f"{exc}; gc stopped after deleting {len(report['swept'])} objects "
                               f"({human(freed)}); run it again to finish")
        stopped.report = report  # type: ignore[attr-defined]
        raise stopped from exc
    report["requests"], report["seconds"] = gc.calls.n, round(time.monotonic() - t0, 3)
    gc.summary(report, kept)
    return report


def _keep_list(keep: Iterable[str] | str | None) -> list[str]:
    if keep is None:
        return []
    items = keep.split(",") if isinstance(keep, str) else list(keep)
    return [str(k).strip() for k in items if str(k).strip()]


def _keep_runs(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        n = int(str(value).strip()) if not isinstance(value, bool) else -1
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(f"keep_runs={value!r}: expected a whole number, 0 or more")
    return n


def _since(value: Any) -> datetime | None:
    """``keep_since`` as an aware UTC time, to the second: an ISO date or time, or a
    duration ago (``7d``), read as ``slp task=runs since=`` reads it."""
    if value is None or value == "":
        return None
    from .pipeline.history import _when

    return _when("keep_since", value, datetime.now(timezone.utc)).replace(microsecond=0)


def _select_runs(runs: list[_Run], keep_runs: int | None, since: datetime | None) -> list[_Run]:
    """All runs, or the ``keep_runs`` newest (by the second in the run id, then the
    manifest's start_time), or those started since ``since`` (by the run id); both: either."""
    if keep_runs is None and since is None:
        return runs
    from .pipeline.history import _id_time

    newest = sorted(runs, key=lambda r: (r.run_id[:19], r.start_time, r.run_id), reverse=True)
    chosen: set[str] = set()
    if keep_runs is not None:
        chosen.update(r.run_id for r in newest[:keep_runs])
    if since is not None:
        chosen.update(r.run_id for r in newest if _id_time(r.run_id) >= since)
    return [r for r in newest if r.run_id in chosen]


def _epoch(value: Any) -> float | None:
    """A listing or info time (float, datetime, or an RFC 3339 string) as Unix seconds."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, str):
        text = value.strip()
        head, _, frac = text.rstrip("Z").partition(".")
        try:
            if text.endswith("Z"):  # Go's RFC 3339 with nanoseconds: fromisoformat takes microseconds
                return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00" if frac
                                              else f"{head}+00:00").timestamp()
            when = datetime.fromisoformat(text)
            return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
        except ValueError:
            return None
    return None


def _stamp(entry: dict | None) -> float | None:
    if not entry:
        return None
    return _epoch(entry.get("LastModified") or entry.get("mtime"))


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _duration(seconds: float) -> str:
    s = float(seconds)
    if s >= 3600 and s % 3600 == 0:
        return f"{s / 3600:.0f}h"
    if s >= 60 and s % 60 == 0:
        return f"{s / 60:.0f}m"
    return f"{s:g}s"


def _base(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _artifact_hashes(value: Any) -> Iterable[str]:
    """The hashes of the artifacts a stage-cache record's outputs name."""
    if isinstance(value, dict):
        if set(value) == {"artifact", "blake3", "size"} and isinstance(value["blake3"], str):
            yield value["blake3"]
        else:
            for v in value.values():
                yield from _artifact_hashes(v)
    elif isinstance(value, list):
        for v in value:
            yield from _artifact_hashes(v)


class _Gc:
    def __init__(self, store: ArtifactStore, runs_dir: str, grace: float, apply: bool, out: TextIO, workers: int = 8):
        self.store, self.backend, self.fs = store, store.backend, store.fs
        self.runs_dir, self.grace, self.apply, self.out = runs_dir, float(grace), apply, out
        self.workers = max(1, int(workers))
        self.calls = _Counter()
        self.now = time.time()

    def where(self) -> str:
        return f"{self.backend.name} backend at {self.backend.location}"

    # -- mark -----------------------------------------------------------------------

    def read_runs(self) -> list[_Run]:
        """Every run manifest, local or in the backend, one per run id; one that cannot
        be read as JSON stops the gc."""
        from .pipeline.run_folder import RUN_ID_RE

        local: dict[str, str] = {}
        if os.path.isdir(self.runs_dir):
            for name in os.listdir(self.runs_dir):
                path = os.path.join(self.runs_dir, name, "manifest.json")
                if RUN_ID_RE.fullmatch(name) and os.path.exists(path):
                    local[name] = path
            staging = os.path.join(self.runs_dir, ".staging")
            # A run killed after writing its manifest, before its folder moved into place.
            for name in (os.listdir(staging) if os.path.isdir(staging) else []):
                path = os.path.join(staging, name, "manifest.json")
                if RUN_ID_RE.fullmatch(name) and name not in local and os.path.exists(path):
                    local[name] = path
        runs = []
        for run_id, path in sorted(local.items()):
            try:
                with open(path, "rb") as f:
                    runs.append(_Run(run_id, path, f.read()))
            except FileNotFoundError:  # removed meanwhile: the backend copy (if any) stands in
                continue
        have = {r.run_id for r in runs}
        folder = self.backend.path(RUNS)
        try:
            self.calls.add()
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            entries = []
        remote = {_base(e["name"]): self.backend.path(RUNS, _base(e["name"]), "manifest.json") for e in entries
                  if e.get("type") == "directory" and RUN_ID_RE.fullmatch(_base(e["name"]))}
        wanted = [path for run_id, path in sorted(remote.items()) if run_id not in have]
        if wanted:
            self.calls.add(len(wanted))
            got = self.fs.cat(wanted, on_error="return")
            by_path = {self.fs._strip_protocol(p): v for p, v in got.items()}
            for run_id, path in sorted(remote.items()):
                if run_id in have:
                    continue
                data = by_path.get(self.fs._strip_protocol(path))
                if isinstance(data, FileNotFoundError) or data is None:
                    continue  # a folder whose manifest is not there yet (uploaded last): no run yet
                if isinstance(data, BaseException):
                    raise data
                runs.append(_Run(run_id, path, data))
        for run in runs:
            try:
                manifest = orjson.loads(run.data)
                if not isinstance(manifest, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                raise IntegrityError(f"run manifest {run.where} is damaged (not a JSON object): gc stopped, nothing "
                                     "deleted; restore that run folder (or remove it), then run gc again") from None
            run.manifest = manifest
            run.start_time = str(manifest.get("start_time") or "")
        return runs

    def read_names(self) -> list[dict[str, Any]]:
        """Every ref; one that cannot be read stops the gc (it may name what is swept)."""
        from .refs import REFS, load_ref

        root = self.backend.path(REFS)
        try:
            self.calls.add()
            paths = [p for p in self.fs.find(root) if p.endswith(".json")]
        except FileNotFoundError:
            return []
        if not paths:
            return []
        self.calls.add(len(paths))
        records = []
        for path, data in sorted(self.fs.cat(paths, on_error="return").items()):
            if isinstance(data, FileNotFoundError):
                continue  # untagged meanwhile
            if isinstance(data, BaseException):
                raise data
            try:
                records.append(load_ref(data, path))
            except IntegrityError as exc:
                raise IntegrityError(f"{exc} (or `slp task=fsck fix=true` removes it); gc stopped, nothing deleted") \
                    from None
        return records

    def list_stored(self) -> list[_Stored]:
        stored: list[_Stored] = []
        for kind in KINDS.values():
            folder = self.backend.path(kind.folder)
            try:
                self.calls.add()
                entries = self.fs.ls(folder, detail=True)
            except FileNotFoundError:
                continue
            found: dict[str, _Stored] = {}
            for e in entries:
                if e.get("type") != "file":
                    continue
                base = _base(e["name"])
                if base.endswith(MANIFEST_SUFFIX):
                    oid, slot = base[: -len(MANIFEST_SUFFIX)], "manifest"
                elif base.endswith(kind.suffix):
                    oid, slot = base[: -len(kind.suffix)], "obj"
                else:
                    continue
                if _OID.fullmatch(oid):  # anything else in the folder is not the store's to delete
                    setattr(found.setdefault(oid, _Stored(kind, oid)), slot, e)
            stored += [found[oid] for oid in sorted(found)]
        return stored

    def resolve_keep(self, keep: list[str], stored: list[_Stored]) -> set[str]:
        from .refs import resolve

        present = {s.oid for s in stored}
        hashes = set()
        for text in keep:
            ref = resolve(self.store, text)
            if ref.oid not in present:
                raise ConfigError(f"keep={text}: no object {ref.oid} in {self.where()}; gc stopped, nothing deleted")
            hashes.add(ref.oid)
        return hashes

    # -- sweep ----------------------------------------------------------------------

    def age(self, entry: _Stored, refreshed: tuple[dict | None, dict | None] | None = None) -> float:
        """Seconds since the newer of the object's and its manifest's last write
        (-inf, never old, when the backend gives neither time)."""
        obj, man = refreshed if refreshed is not None else (entry.obj, entry.manifest)
        stamps = [s for s in (_stamp(obj), _stamp(man)) if s is not None]
        missing_time = (obj is not None and _stamp(obj) is None) or (man is not None and _stamp(man) is None)
        if not stamps or missing_time:
            return float("-inf")  # cannot date it: never delete it
        return time.time() - max(stamps)

    def _info(self, path: str) -> dict | None:
        self.calls.add()
        try:
            return self.fs.info(path, refresh=True)  # s3fs would answer from its listing cache otherwise
        except FileNotFoundError:
            return None

    def _rm(self, path: str) -> bool:
        self.calls.add()
        try:
            self.fs.rm_file(path)
            return True
        except FileNotFoundError:  # gone meanwhile (another gc): as good as deleted
            return False

    def sweep(self, candidates: list[_Stored], report: dict[str, Any]) -> list[_Stored]:
        """Delete (dry run: list) the candidates, ``workers`` objects at a time; each one
        re-checked, then its object deleted, then its manifest, in that order. A backend
        error stops the sweep (objects in flight finish) and is raised once all that was
        deleted is in ``report``."""
        if self.apply and candidates:
            stop = threading.Event()
            with ThreadPoolExecutor(max_workers=min(self.workers, len(candidates)),
                                    thread_name_prefix="slp-gc") as pool:
                outcomes = list(pool.map(lambda e: self._sweep_one(e, stop), candidates))
        else:
            outcomes = [("swept", e, None) for e in candidates]
        swept: list[_Stored] = []
        error: BaseException | None = None
        for status, entry, exc in outcomes:
            error = error or exc
            if status == "refreshed":
                report["refreshed"] += 1  # a put touched it since it was listed: kept
            if status not in ("swept", "object-only") or entry is None:
                continue
            item = self._item(entry)
            report["swept"].append(item)
            report["freed_bytes"] += entry.size + (entry.manifest_size if status == "swept" else 0)
            swept.append(entry)
            if len(report["swept"]) <= SHOWN:
                verb = "deleted" if self.apply else "would delete"
                what = f"{entry.kind.name} {entry.oid} {human(entry.size)}" if entry.obj is not None else \
                    f"{entry.kind.name} manifest {entry.oid} {human(entry.manifest_size)} (object already gone)"
                print(f"{verb} {what}, modified {item['modified']}", file=self.out, flush=True)
        if len(report["swept"]) > SHOWN:
            print(f"... and {len(report['swept']) - SHOWN} more", file=self.out, flush=True)
        if error is not None:
            raise error
        return swept

    def _sweep_one(self, entry: _Stored, stop: threading.Event) -> tuple[str, _Stored | None, BaseException | None]:
        """``(status, entry as re-checked, error)``; status: swept | object-only (its
        manifest could not be deleted) | refreshed | gone | failed | skipped."""
        if stop.is_set():
            return "skipped", None, None
        obj_path = self.store.object_path(entry.kind, entry.oid)
        man_path = self.store.manifest_path(entry.kind, entry.oid)
        try:
            with backend_errors(self.backend, f"re-checking {obj_path}"):
                obj, man = self._info(obj_path), self._info(man_path)
            if obj is None and man is None:
                return "gone", None, None  # deleted meanwhile (another gc)
            if self.age(entry, (obj, man)) <= self.grace:
                return "refreshed", None, None
            entry = _Stored(entry.kind, entry.oid, obj, man)
            if obj is not None:  # the object first: a stop now leaves only a manifest
                with backend_errors(self.backend, f"deleting {obj_path}"):
                    self._rm(obj_path)
        except BackendError as exc:
            stop.set()
            return "failed", None, exc
        try:
            if man is not None:
                with backend_errors(self.backend, f"deleting {man_path}"):
                    self._rm(man_path)
        except BackendError as exc:
            stop.set()
            return "object-only", entry, exc
        return "swept", entry, None

    @staticmethod
    def _item(entry: _Stored) -> dict[str, Any]:
        stamps = [s for s in (_stamp(entry.obj), _stamp(entry.manifest)) if s is not None]
        return {"kind": entry.kind.name, "hash": entry.oid, "size": entry.size,
                "modified": _iso(max(stamps)) if stamps else None,
                "what": "object" if entry.obj is not None else "orphan-manifest"}

    def drop_stage_cache(self, swept: set[str]) -> int:
        """Delete (dry run: count) the stage-cache records whose outputs name a swept object."""
        if not swept:
            return 0
        folder = self.backend.path(STAGE_CACHE)
        with backend_errors(self.backend, f"reading {folder}"):
            try:
                self.calls.add()
                paths = [e["name"] for e in self.fs.ls(folder, detail=True)
                         if e.get("type") == "file" and e["name"].endswith(".json")]
            except FileNotFoundError:
                return 0
            if not paths:
                return 0
            self.calls.add(len(paths))
            records = self.fs.cat(paths, on_error="return")
        dropped = 0
        for path, data in sorted(records.items()):
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, BaseException):
                with backend_errors(self.backend, f"reading {path}"):
                    raise data
            try:
                record = orjson.loads(data)
            except ValueError:
                continue  # a damaged record is a miss already, and is overwritten when its stage runs
            if not isinstance(record, dict) or not swept.intersection(_artifact_hashes(record.get("outputs"))):
                continue
            if self.apply:
                with backend_errors(self.backend, f"deleting {path}"):
                    self._rm(path)
            dropped += 1
        return dropped

    def summary(self, report: dict[str, Any], kept: int) -> None:
        n, freed = len(report["swept"]), report["freed_bytes"]
        if self.apply:
            head = f"{n} unreferenced objects deleted, {human(freed)} freed"
        else:
            head = f"{n} unreferenced objects, {human(freed)} (dry run: apply=true deletes them)"
        parts = [head, f"{kept} kept", f"{report['young']} younger than {_duration(self.grace)} kept"]
        if report["refreshed"]:
            parts.append(f"{report['refreshed']} refreshed while gc ran kept")
        if report["stage_cache_dropped"]:
            verb = "dropped" if self.apply else "to drop"
            parts.append(f"{report['stage_cache_dropped']} stage-cache records {verb}")
        if report["missing_referenced"]:
            parts.append(f"{report['missing_referenced']} referenced objects missing (task=repair)")
        print(f"gc {self.where()}: " + "; ".join(parts), file=self.out, flush=True)
