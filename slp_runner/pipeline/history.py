"""Looking back at runs: find a run folder, list recent runs, verify a run's
artifacts, and compare a reproduction with its original."""

from __future__ import annotations

import os
import sys
from typing import TextIO

import orjson

from ..artifacts import kind_named
from ..cache import LocalCache
from ..errors import ArtifactNotFound, ConfigError
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


def list_runs(runs_dir: str, limit: int = 20, out: TextIO = sys.stdout) -> list[dict]:
    """Recent runs, newest first, with status and key numbers; then every folder still
    in ``runs/.staging`` (running, abandoned or unknown: see :mod:`.abandoned`)."""
    rows = []
    if os.path.isdir(runs_dir):
        for name in os.listdir(runs_dir):
            mpath = os.path.join(runs_dir, name, "manifest.json")
            if RUN_ID_RE.fullmatch(name) and os.path.exists(mpath):
                with open(mpath, "rb") as f:
                    m = orjson.loads(f.read())
                stages = m.get("stages", {})
                rows.append({
                    "run_id": name, "status": m.get("status"), "pipeline": m.get("pipeline"),
                    "start_time": m.get("start_time") or "", "total_latency_ms": m.get("total_latency_ms") or 0,
                    "stages": len(stages), "cache_hits": sum(1 for s in stages.values() if s.get("cache_hit")),
                    "reproduces": m.get("reproduces"),
                })
    rows = sorted(rows, key=lambda r: r["start_time"], reverse=True)[:limit]  # ids within one second tie
    for r in rows:
        extra = f" reproduces {r['reproduces']}" if r["reproduces"] else ""
        print(f"{r['run_id']}  {r['status']:<11} {r['pipeline'] or '-':<20} {r['total_latency_ms'] / 1000:>8.2f}s "
              f"{r['stages']:>3} stages {r['cache_hits']:>3} cached{extra}", file=out)
    staging = staging_runs(runs_dir)
    for r in staging:
        owner = f"pid {r['pid']} on {r['host']}" if r["pid"] else r["reason"]
        print(f"{r['run_id']}  {r['status']:<11} {r['pipeline'] or '-':<20} {'-':>8}  {len(r['stages']):>3} stages "
              f"in .staging ({owner})", file=out)
    if any(r["status"] == "abandoned" for r in staging):
        print("abandoned runs: `slp task=runs op=finalize` keeps them as runs, `op=clean` deletes them", file=out)
    if not rows and not staging:
        print(f"no runs in {os.path.abspath(runs_dir)}", file=out)
    return rows + staging


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
