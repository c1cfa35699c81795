"""The stage cache: skip a stage whose target, code, parameters and input hashes match
an earlier successful execution, reusing its recorded outputs if they still exist.

Records live in the backend (``stage-cache/<key>.json``), so every machine that
shares a backend shares them. Local files named in parameters are fingerprinted by
size and mtime (as make does), so editing a file invalidates the stages that read it;
files handed over by upstream stages count by content (their BLAKE3), wherever they are.
The code counts as the fingerprint of the module defining the stage's function
(see code_fingerprint: what it covers and what it does not).
"""

from __future__ import annotations

import os
from typing import Any

import blake3
import orjson

from ..hashing import hash_file
from ..cache import LocalCache
from ..redaction import Redactor
from ..store import ArtifactStore, backend_errors
from .context import ArtifactRef, from_json, outputs_still_exist, to_json
from .spec import StageSpec

FOLDER = "stage-cache"


MAX_DIR_ENTRIES = 10_000  # a folder parameter bigger than this counts by its own stat only


def _stat_print(st: os.stat_result) -> list[int]:
    # ctime too: an edit that puts the old mtime back still moves it.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _dir_print(path: str) -> str:
    """BLAKE3 of every file's relative path and stat below ``path`` (bounded)."""
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                entries.append([os.path.relpath(full, path), *_stat_print(os.stat(full))])
            except OSError:
                continue
            if len(entries) > MAX_DIR_ENTRIES:
                return "too-large:" + ":".join(map(str, _stat_print(os.stat(path))))
    return blake3.blake3(orjson.dumps(entries)).hexdigest()


def _fingerprint(value: Any, cache: LocalCache | None = None) -> Any:
    if isinstance(value, dict) and set(value) == {"local_file"}:
        # A file made by an upstream stage: what matters is its content, not where it is.
        path = value["local_file"]
        oid = cache.entry_oid(path) if cache is not None else None
        if oid is not None:  # a verified cache entry is named by its hash; nothing else is trusted so
            return {"blake3": oid}
        return {"blake3": hash_file(path).blake3} if os.path.isfile(path) else value
    if isinstance(value, str) and 0 < len(value) < 4096 and os.path.exists(value):
        # A local file or folder named in the parameters: by stat, as make does (ctime too).
        if os.path.isfile(value):
            return {"file": os.path.abspath(value), "stat": _stat_print(os.stat(value))}
        if os.path.isdir(value):
            return {"dir": os.path.abspath(value), "entries": _dir_print(value)}
        return value
    if isinstance(value, dict):
        return {k: _fingerprint(v, cache) for k, v in value.items()}
    if isinstance(value, list):
        return [_fingerprint(v, cache) for v in value]
    return value


def stage_key(spec: StageSpec, kwargs: dict[str, Any], cache: LocalCache | None = None) -> str:
    """BLAKE3 of the stage's target, its code fingerprint and its resolved arguments
    (artifact hashes included).

    An edited stage misses by its code; its downstream stages do not see the code,
    only its outputs, by content. So they run again when the outputs changed and stay
    hits when the outputs came out byte-identical: early cutoff, as DVC and Bazel do.
    """
    payload = {"target": spec.target, "code": spec.code, "kwargs": _fingerprint(to_json(kwargs), cache)}
    return blake3.blake3(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()


class StageCache:
    """cache: the local cache whose entries recorded outputs may name; a hit whose
    entry no longer validates is a miss (the stage runs and fetches it again)."""

    def __init__(self, store: ArtifactStore, redactor: Redactor | None = None, cache: LocalCache | None = None):
        self.store = store
        self.redactor = redactor
        self.cache = cache

    def _path(self, key: str) -> str:
        return self.store.backend.path(FOLDER, f"{key}.json")

    def lookup(self, spec: StageSpec, key: str) -> dict | None:
        """The recorded execution for ``key`` if it is one (a damaged or foreign record
        is a miss, overwritten when the stage has run) and its outputs all still exist."""
        with backend_errors(self.store.backend, "reading the stage cache"):
            try:
                data = self.store.fs.cat_file(self._path(key))
            except FileNotFoundError:
                return None
        try:
            record = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(record, dict) or record.get("key") != key or record.get("target") != spec.target \
                or not isinstance(record.get("outputs"), dict):
            return None
        outputs = from_json(record["outputs"])
        if not outputs_still_exist(self.store, outputs, self.cache):
            return None
        # A gc running now may have listed these as unreferenced: a new manifest time keeps them.
        if not all(self.store.refresh(ref.kind, ref.oid) for ref in _artifact_refs(outputs)):
            return None
        record["outputs"] = outputs
        return record

    def record(self, key: str, spec: StageSpec, outputs: dict, metrics: dict, run_id: str,
               moves_to: tuple[str, str] | None = None) -> None:
        """Record a successful execution. ``moves_to=(staging, final)``: local files the
        stage wrote inside the run folder are recorded at the place the folder will have."""
        recorded = to_json(outputs)
        if moves_to:
            recorded = _relocate(recorded, *moves_to)
        data = {"key": key, "stage": spec.name, "target": spec.target, "code": spec.code, "run_id": run_id,
                "outputs": recorded, "metrics": metrics}
        if self.redactor is not None:  # records are shared through the backend: no credential in them
            data = self.redactor.tree(data, names=False)
        self.store.put_bytes(orjson.dumps(data, default=str), f"{FOLDER}/{key}.json")


def _artifact_refs(value: Any) -> list[ArtifactRef]:
    if isinstance(value, ArtifactRef):
        return [value]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _artifact_refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _artifact_refs(v)]
    return []


def _relocate(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        if set(value) == {"local_file"} and value["local_file"].startswith(old + os.sep):
            return {"local_file": new + value["local_file"][len(old):]}
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    return value
