"""What a stage function receives and may return.

A stage is a plain function ``fn(ctx, **params_and_inputs) -> dict``. The returned
mapping holds its outputs: JSON values, :class:`ArtifactRef` (an artifact in the
store, by hash) or :class:`LocalFile` (a file on this machine). The runner records
them in the run manifest and the stage cache, and hands them to downstream stages.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ..artifacts import ArtifactKind, kind_named
from ..cache import LocalCache
from ..store import ArtifactStore


@dataclass(frozen=True)
class ArtifactRef:
    kind: ArtifactKind
    oid: str
    size: int

    def to_json(self) -> dict:
        return {"artifact": self.kind.name, "blake3": self.oid, "size": self.size}


@dataclass(frozen=True)
class LocalFile:
    path: str

    def to_json(self) -> dict:
        return {"local_file": self.path}


def to_json(value: Any) -> Any:
    """Outputs as JSON-ready data (artifacts and local files as tagged mappings)."""
    if isinstance(value, (ArtifactRef, LocalFile)):
        return value.to_json()
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"artifact", "blake3", "size"}:
            return ArtifactRef(kind_named(value["artifact"]), value["blake3"], value["size"])
        if set(value) == {"local_file"}:
            return LocalFile(value["local_file"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def outputs_still_exist(store: ArtifactStore, outputs: Any, cache: LocalCache | None = None) -> bool:
    """True when every artifact is still in the store and every local file on disk
    (a local cache entry only if it still validates: it is handed on as verified)."""
    if isinstance(outputs, ArtifactRef):
        return store.exists(outputs.kind, outputs.oid)
    if isinstance(outputs, LocalFile):
        if cache is not None and cache.entry_oid(outputs.path) is not None:
            return cache.entry_is_valid(outputs.path)
        return os.path.exists(outputs.path)
    if isinstance(outputs, dict):
        return all(outputs_still_exist(store, v, cache) for v in outputs.values())
    if isinstance(outputs, list):
        return all(outputs_still_exist(store, v, cache) for v in outputs)
    return True


@dataclass
class StageContext:
    """The run's shared services, plus this stage's own folder, log and metrics."""

    name: str
    store: ArtifactStore
    cache: LocalCache
    run_dir: str  # the run folder being written (stage files go in stage_dir)
    log: logging.Logger
    metrics: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # run-wide settings (engine, ...)
    # Run-scoped cleanups: what a stage starts for later stages (a server) is closed
    # when the run ends, however it ends.
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def stage_dir(self) -> str:
        path = os.path.join(self.run_dir, "stages", self.name)
        os.makedirs(path, exist_ok=True)
        return path
