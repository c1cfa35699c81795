"""The stage cache: skip a stage whose target, parameters and input hashes match an
earlier successful execution, reusing its recorded outputs if they still exist.

Records live in the backend (``stage-cache/<key>.json``), so every machine that
shares a backend shares them. Local files named in parameters are fingerprinted by
size and mtime (as make does), so editing a file invalidates the stages that read it;
files handed over by upstream stages count by content (their BLAKE3), wherever they are.
"""

from __future__ import annotations

import os
from typing import Any

import blake3
import orjson

from ..hashing import OID_RE, hash_file
from ..store import ArtifactStore, backend_errors
from .context import from_json, outputs_still_exist, to_json
from .spec import StageSpec

FOLDER = "stage-cache"


def _fingerprint(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"local_file"}:
        # A file made by an upstream stage: what matters is its content, not where it is.
        path = value["local_file"]
        name = os.path.basename(path)
        if OID_RE.fullmatch(name.split(".", 1)[0]):  # a cache entry is named by its hash
            return {"blake3": name.split(".", 1)[0]}
        return {"blake3": hash_file(path).blake3} if os.path.isfile(path) else value
    if isinstance(value, str) and len(value) < 4096 and os.path.isfile(value):
        st = os.stat(value)
        return {"file": os.path.abspath(value), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if isinstance(value, dict):
        return {k: _fingerprint(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fingerprint(v) for v in value]
    return value


def stage_key(spec: StageSpec, kwargs: dict[str, Any]) -> str:
    """BLAKE3 of the stage's target and its resolved arguments (artifact hashes included)."""
    payload = {"target": spec.target, "kwargs": _fingerprint(to_json(kwargs))}
    return blake3.blake3(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()


class StageCache:
    def __init__(self, store: ArtifactStore):
        self.store = store

    def _path(self, key: str) -> str:
        return self.store.backend.path(FOLDER, f"{key}.json")

    def lookup(self, key: str) -> dict | None:
        """The recorded execution for ``key`` if its outputs all still exist."""
        with backend_errors(self.store.backend, "reading the stage cache"):
            try:
                record = orjson.loads(self.store.fs.cat_file(self._path(key)))
            except FileNotFoundError:
                return None
        outputs = from_json(record.get("outputs", {}))
        if not outputs_still_exist(self.store, outputs):
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
        data = {"key": key, "stage": spec.name, "target": spec.target, "run_id": run_id,
                "outputs": recorded, "metrics": metrics}
        self.store.put_bytes(orjson.dumps(data, default=str), f"{FOLDER}/{key}.json")


def _relocate(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        if set(value) == {"local_file"} and value["local_file"].startswith(old + os.sep):
            return {"local_file": new + value["local_file"][len(old):]}
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    return value
