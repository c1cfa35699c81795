"""``slp task=fsck``: find (and with ``fix=true`` remove or mend) what faults leave behind.

What it looks at, on any backend:

- ``.incoming/`` parts older than the grace period (a put killed before its rename);
- S3 multipart uploads in progress under the store's prefix, older than the grace
  period (a put killed before complete or abort): they hold storage nobody can see;
- in the local cache: temporary downloads (``.part``), kept partial downloads
  (``.partial``) and lock files of absent entries that no process holds, older than
  the grace period;
- manifests whose object is gone (removed with ``fix``) and objects without a manifest
  (with ``fix``, re-hashed and given a manifest rebuilt from the object);
- names (``refs/``) that are damaged (removed with ``fix``) or name an object not stored;
- runs whose process died (abandoned staging folders; removed with ``fix``);
- with ``sample=F``, the bytes of a random fraction F of the stored objects, re-hashed
  (as restic's ``check --read-data-subset``): damage is reported, never "fixed" here
  (``task=repair`` replaces an object from a good copy).

Nothing younger than the grace period is touched: a put or get in flight on another
machine looks exactly like a leftover. Damage (corrupt objects, manifests that do not
describe their object, objects that could not be given a manifest) makes the exit
code non-zero; leftovers alone do not.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, TextIO

from . import manifest as manifests
from .artifacts import KINDS, ArtifactKind
from .cache import LocalCache
from .local_output import human
from .store import INCOMING, ArtifactStore, backend_errors


@dataclass
class Finding:
    kind: str  # leftover | damage
    what: str  # incoming, multipart-upload, cache-part, cache-lock, orphan-manifest, ...
    where: str
    detail: str
    fixed: bool = False

    def line(self, fix: bool) -> str:
        state = " (removed)" if self.fixed and self.kind == "leftover" else " (fixed)" if self.fixed else ""
        return f"{self.kind.upper():8} {self.what:16} {self.where}: {self.detail}{state}"


def parse_grace(value: Any) -> float:
    """Seconds from ``3600``, ``90s``, ``30m``, ``24h`` or ``7d``."""
    from .errors import ConfigError

    text = str(value).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ConfigError(f"grace={value!r}: expected seconds or a duration such as 30m, 24h, 7d") from None


def _age(fs, path: str, info: dict | None = None) -> float:
    """Seconds since ``path`` was last written, whatever the backend reports."""
    info = info or {}
    stamp = info.get("LastModified") or info.get("mtime")
    if stamp is None:
        stamp = fs.modified(path)
    if isinstance(stamp, (int, float)):
        return time.time() - float(stamp)
    if isinstance(stamp, str):
        stamp = fs.modified(path)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - stamp).total_seconds()


def _files(fs, folder: str) -> list[dict]:
    try:
        return [e for e in fs.ls(folder, detail=True) if e.get("type") == "file"]
    except FileNotFoundError:
        return []


def _base(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


class Fsck:
    def __init__(self, store: ArtifactStore, cache: LocalCache, runs_dir: str, *, fix: bool = False,
                 grace: float = 86400.0, sample: float = 0.0, out: TextIO = sys.stdout):
        self.store, self.cache, self.runs_dir = store, cache, runs_dir
        self.fs = store.fs
        self.fix, self.grace, self.sample, self.out = fix, grace, sample, out
        self.findings: list[Finding] = []
        self.stored: set[tuple[str, str]] = set()  # (kind, oid) of every stored object

    def report(self, finding: Finding) -> None:
        self.findings.append(finding)
        print(finding.line(self.fix), file=self.out, flush=True)

    def leftover(self, what: str, where: str, detail: str, remove: Callable[[], None]) -> None:
        """Report a leftover; with ``fix``, ``remove()`` it first."""
        finding = Finding("leftover", what, where, detail)
        if self.fix:
            remove()
            finding.fixed = True
        self.report(finding)

    def run(self) -> list[Finding]:
        backend = self.store.backend
        with backend_errors(backend, "checking the store"):
            self.incoming()
            self.multipart_uploads()
            self.objects_and_manifests()
            self.names()
        self.cache_leftovers()
        self.abandoned_runs()
        damage = sum(1 for f in self.findings if f.kind == "damage" and not f.fixed)
        leftovers = sum(1 for f in self.findings if f.kind == "leftover" and not f.fixed)
        fixed = sum(1 for f in self.findings if f.fixed)
        print(f"fsck {backend.name} backend at {backend.location}: {damage} damaged, {leftovers} leftovers"
              f"{'' if self.fix else ' (dry run: fix=true removes them)'}, {fixed} fixed", file=self.out, flush=True)
        return self.findings

    # -- the backend ----------------------------------------------------------------

    def incoming(self) -> None:
        for entry in _files(self.fs, self.store.backend.path(INCOMING)):
            age = _age(self.fs, entry["name"], entry)
            if age < self.grace:
                continue
            self.leftover("incoming", entry["name"], f"{human(int(entry.get('size') or 0))}, {age / 3600:.1f} h old",
                          lambda name=entry["name"]: self.fs.rm(name))

    def multipart_uploads(self) -> None:
        if self.store.backend.name != "s3":
            return
        from .backends.s3_uploads import abort_upload, uploads_in_progress

        for upload in uploads_in_progress(self.fs, self.store.backend.root):
            age = (datetime.now(timezone.utc) - upload["Initiated"]).total_seconds()
            if age < self.grace:
                continue
            self.leftover("multipart-upload", f"{upload['Bucket']}/{upload['Key']}",
                          f"upload {upload['UploadId'][:16]}..., {upload['parts']} parts, "
                          f"{human(upload['bytes'])}, {age / 3600:.1f} h old",
                          lambda upload=upload: abort_upload(self.fs, upload))

    def objects_and_manifests(self) -> None:
        sampled: list[tuple[ArtifactKind, str]] = []
        for kind in KINDS.values():
            entries = _files(self.fs, self.store.backend.path(kind.folder))
            objects = {_base(e["name"])[: -len(kind.suffix)]: e for e in entries
                       if _base(e["name"]).endswith(kind.suffix) and not _base(e["name"]).endswith(".manifest.json")}
            manifests_ = {_base(e["name"])[: -len(".manifest.json")]: e for e in entries
                          if _base(e["name"]).endswith(".manifest.json")}
            for oid, entry in sorted(manifests_.items()):
                if oid not in objects:
                    self.orphan_manifest(kind, oid, entry)
            self.stored.update((kind.name, oid) for oid in objects)
            for oid, entry in sorted(objects.items()):
                if oid not in manifests_:
                    self.orphan_object(kind, oid, entry)
                else:
                    sampled.append((kind, oid))
        if self.sample > 0 and sampled:
            count = max(1, round(len(sampled) * min(self.sample, 1.0)))
            for kind, oid in random.sample(sampled, count):
                check = self.store.verify(kind, oid)
                if not check.ok:
                    self.report(Finding("damage", "corrupt-object", self.store.object_path(kind, oid), check.detail))
            print(f"re-hashed {count} of {len(sampled)} objects (sample={self.sample})", file=self.out)

    def names(self) -> None:
        """Refs (``refs/<name>/<tag>.json``) that cannot be read, or name an object that
        is not stored. A ref is published whole, so a damaged one is damage, not a put
        in flight: with ``fix`` it is removed (the object stays, by hash). A ref to a
        lost object is left for ``task=repair`` or ``task=untag`` to settle."""
        from .refs import REFS, load_ref
        from .errors import IntegrityError

        root = self.store.backend.path(REFS)
        if not self.fs.exists(root):
            return
        for path in sorted(p for p in self.fs.find(root) if p.endswith(".json")):
            try:
                record = load_ref(self.fs.cat_file(path), path)
            except FileNotFoundError:  # untagged meanwhile
                continue
            except IntegrityError:
                finding = Finding("damage", "damaged-ref", path, "not a readable ref (fix=true removes it)")
                if self.fix:
                    self.fs.rm(path)
                    finding.fixed, finding.detail = True, "not a readable ref: removed"
                self.report(finding)
                continue
            if (record["kind"], record["hash"]) not in self.stored:
                self.report(Finding("damage", "dangling-ref", path,
                                    f"{record['name']}:{record['tag']} names {record['kind']} {record['hash']}, which "
                                    f"is not stored (task=repair hash={record['hash'][:12]} path=..., or task=untag)"))

    def orphan_manifest(self, kind: ArtifactKind, oid: str, entry: dict) -> None:
        if _age(self.fs, entry["name"], entry) < self.grace:
            return
        self.leftover("orphan-manifest", entry["name"],
                      f"its {kind.name} object is gone (task=repair hash={oid} path=... restores it)",
                      lambda: self.fs.rm(entry["name"]))

    def orphan_object(self, kind: ArtifactKind, oid: str, entry: dict) -> None:
        path = entry["name"]
        if _age(self.fs, path, entry) < self.grace:  # a put between its object and its manifest
            return
        if not self.fix:
            self.report(Finding("damage", "no-manifest", path, "object without a manifest (fix=true rebuilds it)"))
            return
        check = self.store.verify(kind, oid)  # re-hash before vouching for it in a manifest
        if check.detail.startswith("corrupt") or check.detail == "missing":
            self.report(Finding("damage", "corrupt-object", path, check.detail))
            return
        record = manifests.build_manifest(
            kind, _digest(oid, check.size), file_name=f"{oid}{kind.suffix}", source=path, tool="slp fsck",
            verification="rehash", verified_at=manifests.utc_now(), provenance={"rebuilt_by": "slp fsck"})
        self.store.put_bytes(manifests.dumps(record), kind.manifest_name(oid))
        self.report(Finding("damage", "no-manifest", path, "object without a manifest: re-hashed, manifest rebuilt",
                            fixed=True))

    # -- this machine ---------------------------------------------------------------

    def cache_leftovers(self) -> None:
        for path, what in self._cache_candidates():
            try:
                age = time.time() - os.stat(path).st_mtime
            except FileNotFoundError:
                continue
            if age < self.grace:
                continue
            lock = path if what == "cache-lock" else _entry_lock(path)
            if lock is not None and os.path.exists(lock) and not _lock_is_free(lock):
                continue  # a get holds it right now (and may be resuming this very partial)
            self.leftover(what, path, f"{human(os.path.getsize(path))}, {age / 3600:.1f} h old",
                          lambda path=path: _unlink(path))

    def _cache_candidates(self) -> Iterator[tuple[str, str]]:
        for kind in KINDS.values():
            folder = os.path.join(self.cache.root, kind.folder)
            if not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if name.endswith(".part") or name.endswith(".tmp"):
                    yield path, "cache-part"
                elif name.endswith(".partial"):
                    yield path, "cache-partial"
                elif name.endswith(".lock") and not os.path.exists(path[: -len(".lock")]):
                    yield path, "cache-lock"  # beside an entry a lock is normal; alone, a get failed
                elif name.endswith(".inuse") and not os.path.exists(path[: -len(".inuse")]):
                    yield path, "cache-lock"  # a hold whose entry went (a get that failed after it)

    def abandoned_runs(self) -> None:
        try:
            from .pipeline.abandoned import find_abandoned, remove_abandoned
        except ImportError:  # pragma: no cover - the module ships with the package
            return
        for run in find_abandoned(self.runs_dir):
            folder = run.get("path") or os.path.join(self.runs_dir, ".staging", run["run_id"])
            if _newest_mtime_age(folder) < self.grace:  # a kill a minute ago: its owner may want it
                continue
            self.leftover("abandoned-run", run.get("path", run["run_id"]), f"run {run['run_id']} whose process is gone",
                          lambda run_id=run["run_id"]: remove_abandoned(self.runs_dir, run_id))


def _entry_lock(path: str) -> str | None:
    """The lock of the cache entry a temporary or partial download belongs to."""
    name = os.path.basename(path)
    if name.endswith(".partial") and name.startswith("."):  # .<oid>.partial
        oid = name[1:-len(".partial")]
        for kind in KINDS.values():
            if os.path.basename(os.path.dirname(path)) == kind.folder:
                return os.path.join(os.path.dirname(path), f"{oid}{kind.suffix}.lock")
    return None  # a .part has a random name: its age is all there is


def _newest_mtime_age(folder: str) -> float:
    newest = 0.0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
            except OSError:
                continue
    return time.time() - newest if newest else float("inf")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:  # gone meanwhile: as good as removed
        pass


def _lock_is_free(path: str) -> bool:
    """True if no process holds the filelock at ``path`` (we take it for an instant).
    Removing it after is racy only against a get that starts in that instant on a
    lock already older than the grace period: such a get may then download once more."""
    from filelock import FileLock, Timeout

    lock = FileLock(path, timeout=0)
    try:
        with lock:
            return True
    except Timeout:
        return False


def _digest(oid: str, size: int):
    from .hashing import FileDigest

    return FileDigest(oid, size)


def fsck(store: ArtifactStore, cache: LocalCache, runs_dir: str, *, fix: bool = False, grace: float = 86400.0,
         sample: float = 0.0, out: TextIO = sys.stdout) -> list[Finding]:
    """Check the store, the cache and the runs folder; see the module docstring."""
    if not 0 <= sample <= 1:
        from .errors import ConfigError

        raise ConfigError(f"sample={sample}: expected a fraction from 0 to 1")
    return Fsck(store, cache, runs_dir, fix=fix, grace=grace, sample=sample, out=out).run()


def damage_remains(findings: list[Finding]) -> bool:
    return any(f.kind == "damage" and not f.fixed for f in findings)

