"""Built-in stages: the seed's store tools as pipeline steps, plus small utilities.

Every stage is a plain function ``fn(ctx, **kwargs) -> dict`` and can be named in a
pipeline YAML as ``_target_: slp_runner.stages.builtin.<name>``. A user's own stage
is written the same way, anywhere importable.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

from ..artifacts import MODEL, PROMPTS, RESULTS, ArtifactKind, kind_named
from ..errors import InputError
from ..pipeline.context import ArtifactRef, LocalFile, StageContext


def _kind(kind: str | ArtifactKind | None) -> ArtifactKind | None:
    return kind if isinstance(kind, ArtifactKind) or kind is None else kind_named(kind)


def put_artifact(ctx: StageContext, path: str, kind: str = "blob", name: str | None = None,
                 provenance: dict | None = None, tag: str | None = None) -> dict:
    """Store a local file, named ``name[:tag]`` if a name is given; outputs ``artifact``."""
    from ..refs import parse_name, write_ref

    if name:
        name, inline_tag = parse_name(f"{name}:{tag}" if tag and ":" not in str(name) else str(name))
        tag = inline_tag
    result = ctx.store.put(path, _kind(kind), name=name, provenance=provenance, tool=f"slp stage {ctx.name}")
    if name:
        ref = write_ref(ctx.store, name, tag, result.kind, result.oid, result.size)
        ctx.metrics["ref"] = f"{ref['name']}:{ref['tag']}"
    ctx.metrics.update(uploaded=result.uploaded, size_bytes=result.size, upload_seconds=round(result.seconds, 4),
                       hash_seconds=round(result.hash_seconds, 4), verification=result.verification)
    if result.uploaded:
        ctx.metrics["upload_mib_per_s"] = round(result.mib_per_s, 1)
    ctx.log.info("%s %s %s", "uploaded" if result.uploaded else "deduplicated", result.kind.name, result.oid)
    return {"artifact": ArtifactRef(result.kind, result.oid, result.size)}


put_artifact.slp_uncached_when = ("name",)  # see Runner: the name is written every run


def put_model(ctx: StageContext, path: str, name: str | None = None, provenance: dict | None = None,
              tag: str | None = None) -> dict:
    """slp_put_model: outputs ``model``."""
    return {"model": put_artifact(ctx, path, MODEL, name, provenance, tag)["artifact"]}


put_model.slp_uncached_when = ("name",)


def put_prompts(ctx: StageContext, path: str, name: str | None = None, provenance: dict | None = None,
                tag: str | None = None) -> dict:
    """slp_put_prompts: outputs ``prompts``."""
    return {"prompts": put_artifact(ctx, path, PROMPTS, name, provenance, tag)["artifact"]}


put_prompts.slp_uncached_when = ("name",)


def fetch(ctx: StageContext, hash: str | ArtifactRef, kind: str | None = None, full_verify: bool = False) -> dict:
    """Fetch any artifact by hash through the verified cache; outputs ``path`` and ``artifact``."""
    if isinstance(hash, ArtifactRef):
        oid, found_kind = hash.oid, hash.kind
    else:
        oid, found_kind = str(hash), _kind(kind)
    if found_kind is None:
        found_kind = ctx.store.find_kind(oid)
    got = ctx.cache.get(ctx.store, found_kind, oid, full_verify=full_verify)
    ctx.metrics.update(cache_hit=got.cache_hit, validation=got.validation, size_bytes=got.size,
                       seconds=round(got.seconds, 4))
    if not got.cache_hit:
        ctx.metrics["download_mib_per_s"] = round(got.mib_per_s, 1)
    return {"path": LocalFile(got.path), "artifact": ArtifactRef(found_kind, oid, got.size)}


def get_model(ctx: StageContext, hash: str | ArtifactRef, full_verify: bool = False) -> dict:
    """slp_get_model: outputs ``path`` (the cached GGUF) and ``model``."""
    out = fetch(ctx, hash, "model", full_verify)
    return {"path": out["path"], "model": out["artifact"]}


def get_prompts(ctx: StageContext, hash: str | ArtifactRef) -> dict:
    out = fetch(ctx, hash, "prompts")
    return {"path": out["path"], "prompts": out["artifact"]}


def store_results(ctx: StageContext, path: str | LocalFile, kind: str = "results", name: str | None = None) -> dict:
    """Store a results file (from an upstream stage) under its hash; outputs ``results``."""
    local = path.path if isinstance(path, LocalFile) else path
    return {"results": put_artifact(ctx, local, kind or RESULTS.name, name)["artifact"]}


# -- utilities: no-ops, waits and a deterministic transform, for tests and overhead ---


def noop(ctx: StageContext, **_: Any) -> dict:
    """Does nothing; outputs ``done`` so other stages can be ordered after it."""
    return {"done": True}


def sleep(ctx: StageContext, seconds: float = 0.1, **_: Any) -> dict:
    t0 = time.time()
    time.sleep(seconds)
    return {"started": t0, "ended": time.time()}


def fail(ctx: StageContext, message: str = "this stage fails on purpose", **_: Any) -> dict:
    raise InputError(message)


def uppercase_jsonl(ctx: StageContext, path: str | LocalFile, field: str = "prompt") -> dict:
    """Write ``results.jsonl`` with ``field`` upper-cased: a deterministic stand-in for
    inference, for testing reproducibility without an engine."""
    local = path.path if isinstance(path, LocalFile) else path
    target = os.path.join(ctx.stage_dir, "results.jsonl")
    count = 0
    with open(local, "rb") as src, open(target, "wb") as out:
        for line in src:
            if line.strip():
                rec = orjson.loads(line)
                rec[field] = str(rec.get(field, "")).upper()
                out.write(orjson.dumps(rec, option=orjson.OPT_SORT_KEYS) + b"\n")
                count += 1
    ctx.metrics["records"] = count
    return {"results_path": LocalFile(target)}
