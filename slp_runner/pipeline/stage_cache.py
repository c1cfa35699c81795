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

from ..hashing import OID_RE, hash_file
from ..redaction import Redactor
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
    """BLAKE3 of the stage's target, its code fingerprint and its resolved arguments
    (artifact hashes included).

    An edited stage misses by its code; its downstream stages do not see the code,
    only its outputs, by content. So they run again when the outputs changed and stay
    hits when the outputs came out byte-identical: early cutoff, as DVC and Bazel do.
    """
    payload = {"target": spec.target, "code": spec.code, "kwargs": _fingerprint(to_json(kwargs))}
    return blake3.blake3(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()


class StageCache:
    def __init__(self, store: ArtifactStore, redactor: Redactor | None = None):
        self.store = store
        self.redactor = redactor

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
        data = {"key": key, "stage": spec.name, "target": spec.target, "code": spec.code, "run_id": run_id,
                "outputs": recorded, "metrics": metrics}
        if self.redactor is not None:  # records are shared through the backend: no credential in them
            data = self.redactor.tree(data, names=False)
        self.store.put_bytes(orjson.dumps(data, default=str), f"{FOLDER}/{key}.json")


def _relocate(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        if set(value) == {"local_file"} and value["local_file"].startswith(old + os.sep):
            return {"local_file": new + value["local_file"][len(old):]}
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    return value
