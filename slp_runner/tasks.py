"""The tasks ``slp task=<name>`` runs: each turns a composed config into plain values,
calls the core (:mod:`.commands`, the runner, :mod:`.refs`), and returns a
:class:`Report` whose ``data`` is what ``format=json`` prints.

Tasks print their human lines to the ``out`` they are given; with ``format=json``
that is a sink, and stdout gets one JSON document and nothing else.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from .artifacts import KINDS, MODEL, PROMPTS, ArtifactKind, kind_named
from .errors import ConfigError, SlpError

if TYPE_CHECKING:  # imported when a task needs them: a cache hit never loads a backend
    from . import refs
    from .backends import Backend
    from .cache import LocalCache
    from .store import ArtifactStore

FORMATS = ("text", "json")


@dataclass
class Report:
    data: Any  # what format=json prints
    ok: bool = True  # False: exit 1, after the report is printed


def build_backend(cfg: DictConfig) -> Backend:
    """The backend ``cfg.backend`` declares: its ``_target_`` called with its other keys.
    A flat declaration (every backend slp ships) is called directly; one with nested
    targets or Hydra's ``_args_``/``_partial_`` goes through Hydra's instantiate."""
    if "_target_" not in cfg.backend:
        raise ConfigError("backend config has no _target_")
    target = str(cfg.backend._target_)
    spec = OmegaConf.to_container(cfg.backend, resolve=True)
    hydra_only = any(k.startswith("_") and k != "_target_" for k in spec)
    if hydra_only or any(_nested_target(v) for v in spec.values()):
        return _instantiate_with_hydra(cfg, target)
    spec.pop("_target_")
    try:
        factory = _locate(target)
        return factory(**spec)
    except SlpError:  # the factory's own one-line error (a missing extra, ...)
        raise
    except Exception as exc:
        raise ConfigError(f"backend._target_ {target!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}") \
            from None


def _nested_target(value: Any) -> bool:
    if isinstance(value, dict):
        return "_target_" in value or any(_nested_target(v) for v in value.values())
    return isinstance(value, list) and any(_nested_target(v) for v in value)


def _locate(path: str) -> Callable[..., Backend]:
    """``package.module.name`` -> the object (Hydra's ``_locate``, without importing Hydra)."""
    import importlib

    module, _, name = path.rpartition(".")
    if not module:
        raise ImportError(f"Error locating target '{path}': give package.module.function")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"Error locating target '{path}': {exc}") from None
    if not callable(found):
        raise TypeError(f"'{path}' is not callable")
    return found


def _instantiate_with_hydra(cfg: DictConfig, target: str) -> Backend:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.backend, _convert_="all")
    except InstantiationException as exc:
        if isinstance(exc.__cause__, SlpError):  # the factory's own one-line error (a missing extra, ...)
            raise exc.__cause__ from None
        # Hydra's message spans several lines (and may hold the config): keep its first,
        # which names the target and the error.
        cause = exc.__cause__
        reason = f"{type(cause).__name__}: {cause}" if cause else str(exc).strip().splitlines()[0]
        raise ConfigError(f"backend._target_ {target!r}: {reason.splitlines()[0]}") from None


def build_store(cfg: DictConfig) -> ArtifactStore:
    from .hash_memo import MEMO_DIR, HashMemo
    from .store import ArtifactStore

    memo = HashMemo(os.path.join(_cache_root(cfg), MEMO_DIR))
    return ArtifactStore(build_backend(cfg), verify_upload=cfg.verify_upload, verify_existing=cfg.verify_existing,
                         hash_ahead=cfg.hash_ahead, hash_memo=memo)


def _cache_root(cfg: DictConfig) -> str:
    """The local cache's folder (``cache_dir``), where the put memo lives too."""
    return os.path.abspath(os.path.expanduser(cfg.cache_dir))


def open_cache(cfg: DictConfig) -> LocalCache:
    from .cache import LocalCache
    from .cache_lru import parse_size

    section = cfg.get("cache") or {}
    root = _cache_root(cfg)
    return LocalCache(root, max_size=parse_size(section.get("max_size"), root), runs_dir=cfg.runner.runs_dir,
                      keep_runs=section.get("keep_runs"))


def _provenance(cfg: DictConfig) -> dict[str, Any]:
    prov = cfg.get("provenance") or {}
    return OmegaConf.to_container(prov, resolve=True) if isinstance(prov, DictConfig) else dict(prov)


def _need(value: Any, what: str) -> Any:
    if value in (None, ""):
        raise ConfigError(f"missing {what}")
    return value


def _kind(cfg: DictConfig) -> ArtifactKind | None:
    return kind_named(cfg.kind) if cfg.get("kind") else None


REF_HELP = "hash=<hash, 8+ hex prefix, or name[:tag]>"


def _resolve(cfg: DictConfig, store: ArtifactStore, kind: ArtifactKind | None) -> refs.Resolved:
    from . import refs

    return refs.resolve(store, _need(cfg.hash, REF_HELP), kind)


def _name_and_tag(name: Any, tag: Any) -> tuple[str | None, str | None]:
    """``model.name=gemma:q4`` or ``model.name=gemma model.tag=q4``."""
    from . import refs

    if name in (None, ""):
        if tag not in (None, ""):
            raise ConfigError(f"tag={tag} needs a name to tag")
        return None, None
    parsed, inline = refs.parse_name(str(name))
    if tag not in (None, "") and inline and str(tag) != inline:
        raise ConfigError(f"two tags for {parsed}: {inline!r} in the name and {tag!r}")
    tag = str(tag) if tag not in (None, "") else inline
    if tag is not None:
        refs.parse_name(f"{parsed}:{tag}")
    return parsed, tag


# -- store tasks --------------------------------------------------------------


def _put_json(result, store: ArtifactStore) -> dict[str, Any]:
    name, _, tag = (result.ref or "").partition(":")
    return {
        "kind": result.kind.name, "hash": result.oid, "size": result.size,
        "status": "repaired" if result.repaired else "uploaded" if result.uploaded else "deduplicated",
        "repaired": result.repaired, "manifest_rewritten": result.manifest_rewritten, "sent_anyway": result.sent_anyway,
        "seconds": round(result.seconds, 4), "mib_per_s": round(result.mib_per_s, 1),
        "hash_seconds": round(result.hash_seconds, 4), "verification": result.verification,
        "sha256": result.sha256, "object": result.object_path,
        "manifest": store.manifest_path(result.kind, result.oid),
        "name": name or None, "tag": tag or None,
        "backend": store.backend.name,
    }


def _put(section_key: str | None, kind_fixed: ArtifactKind | None = None) -> Callable[[DictConfig, TextIO], Report]:
    def run(cfg: DictConfig, out: TextIO) -> Report:
        from . import commands

        if kind_fixed is not None:
            section = cfg[section_key]
            path = _need(section.path, f"{section_key}.path=<file>")
            kind, source = kind_fixed, section.get("source")
            name, tag = _name_and_tag(section.get("name"), section.get("tag"))
        else:
            kind = kind_named(_need(cfg.kind, "kind=<" + "|".join(KINDS) + ">"))
            path, source = _need(cfg.path, "path=<file>"), None
            name, tag = _name_and_tag(cfg.get("name"), cfg.get("tag"))
        store = build_store(cfg)
        result = commands.put(store, kind, path, name=name, tag=tag, source=source, provenance=_provenance(cfg),
                              sha256=cfg.sha256, progress=cfg.progress, out=out)
        return Report(_put_json(result, store))

    return run


def _get(kind_fixed: ArtifactKind | None = None) -> Callable[[DictConfig, TextIO], Report]:
    def run(cfg: DictConfig, out: TextIO) -> Report:
        from . import commands

        cache, store = open_cache(cfg), StoreOnDemand(cfg)
        kind = kind_fixed or _kind(cfg)
        found = _cached_full_hash(cfg, cache, kind) or _resolve(cfg, store, kind)
        fetched = commands.get(store, cache, found.kind, found.oid, dest=cfg.out,
                               full_verify=cfg.full_verify, progress=cfg.progress, out=out,
                               name=found.given if found.via == "name" else None)
        got = fetched.cached
        return Report({**found.as_dict(), "kind": fetched.kind.name, "size": got.size, "path": fetched.path,
                       "cache_path": got.path, "cache_hit": got.cache_hit, "validation": got.validation,
                       "seconds": round(got.seconds, 4), "mib_per_s": round(got.mib_per_s, 1),
                       "repaired": got.repaired, "resumed_from": got.resumed_from, "reconnects": got.reconnects})

    return run


class StoreOnDemand:
    """The store ``cfg`` declares, built at its first use: a get the cache answers
    never imports a backend's libraries or opens a connection."""

    def __init__(self, cfg: DictConfig):
        self._cfg, self._store = cfg, None

    def __getattr__(self, name: str) -> Any:
        if self._store is None:
            self._store = build_store(self._cfg)
        return getattr(self._store, name)


def _cached_full_hash(cfg: DictConfig, cache: LocalCache, kind: ArtifactKind | None) -> refs.Resolved | None:
    """A full hash whose kind this cache knows (or was given) resolves here, without the
    backend; a prefix or a name is resolved by the store (another object may share it)."""
    from .hashing import OID_RE
    from .refs import Resolved

    given = str(_need(cfg.hash, REF_HELP)).strip()
    if not OID_RE.fullmatch(given.lower()):
        return None
    oid = given.lower()
    if kind is None:
        held = [k for k in KINDS.values() if os.path.exists(cache.path_for(k, oid))]
        if len(held) != 1:
            return None
        kind = held[0]
    return Resolved(oid, kind, given, "hash")


def _repair(cfg: DictConfig, out: TextIO) -> Report:
    from . import commands

    store = build_store(cfg)
    found = _resolve(cfg, store, _kind(cfg))
    result = commands.repair(store, found.kind, found.oid, _need(cfg.path, "path=<local file with the right bytes>"),
                             progress=cfg.progress, out=out)
    return Report(_put_json(result, store))


def _show(cfg: DictConfig, out: TextIO) -> Report:
    from . import commands

    store = build_store(cfg)
    found = _resolve(cfg, store, _kind(cfg))
    return Report(commands.show(store, found.kind, found.oid, out=out))


def _verify(cfg: DictConfig, out: TextIO) -> Report:
    from . import commands

    store = build_store(cfg)
    found = _resolve(cfg, store, _kind(cfg))
    check = commands.verify(store, found.kind, found.oid, out=out)
    return Report({**found.as_dict(), "kind": check.kind.name, "ok": check.ok, "detail": check.detail,
                   "size": check.size}, ok=check.ok)


def _ls(cfg: DictConfig, out: TextIO) -> Report:
    from . import commands

    kinds = [kind_named(cfg.kind)] if cfg.kind else list(KINDS.values())
    name = cfg.get("name")
    listing = commands.list_artifacts(build_store(cfg), kinds, name=str(name) if name else None, out=out)
    return Report(listing)


def _tag(cfg: DictConfig, out: TextIO) -> Report:
    from . import refs

    store = build_store(cfg)
    name, tag = _name_and_tag(_need(cfg.get("name"), "name=<name[:tag]>"), cfg.get("tag"))
    found = _resolve(cfg, store, _kind(cfg))
    kind = found.kind or store.find_kind(found.oid)
    size = store.size_of(kind, found.oid)  # the object must be there to be named
    # A new manifest time first: a gc that listed this object as unreferenced re-checks
    # the time just before deleting, and keeps it (see slp_runner.gc).
    if not store.refresh(kind, found.oid):
        from .errors import ArtifactNotFound

        raise ArtifactNotFound(f"{kind.name} {found.oid} was removed while being tagged; nothing was tagged")
    ref = refs.write_ref(store, name, tag, kind, found.oid, size)
    print(f"tagged {kind.name} {ref['name']}:{ref['tag']} hash={found.oid}", file=out)
    return Report(ref)


def _untag(cfg: DictConfig, out: TextIO) -> Report:
    from . import refs

    store = build_store(cfg)
    name, tag = _name_and_tag(_need(cfg.get("name"), "name=<name:tag>"), cfg.get("tag"))
    ref = refs.remove_ref(store, f"{name}:{tag}" if tag else name)
    print(f"untagged {ref['name']}:{ref['tag']} (was {ref['kind']} hash={ref['hash']})", file=out)
    return Report(ref)


def _fsck(cfg: DictConfig, out: TextIO) -> Report:
    from . import fsck

    findings = fsck.fsck(build_store(cfg), open_cache(cfg), cfg.runner.runs_dir, fix=bool(cfg.fix),
                         grace=fsck.parse_grace(cfg.grace), sample=float(cfg.sample), out=out)
    return Report(findings, ok=not fsck.damage_remains(findings))


def _gc(cfg: DictConfig, out: TextIO) -> Report:
    from .fsck import parse_grace
    from .gc import collect_garbage

    keep = cfg.get("keep")
    keep = [] if keep is None else [str(keep)] if isinstance(keep, (str, int)) else [str(k) for k in keep]
    report = collect_garbage(build_store(cfg), runs_dir=cfg.runner.runs_dir, keep_runs=cfg.get("keep_runs"),
                             keep_since=cfg.get("keep_since"), keep=keep, grace=parse_grace(cfg.grace),
                             apply=bool(cfg.apply), out=out)
    return Report(report)


# -- the local cache ----------------------------------------------------------


def _cache(cfg: DictConfig, out: TextIO) -> Report:
    from . import commands

    from .cache_lru import prune

    cache = open_cache(cfg)
    op = cfg.get("op") or "list"
    if op not in ("list", "prune", "clear"):
        raise ConfigError(f"unknown op {op!r} for task=cache (choose from list, prune, clear)")
    if op == "prune" and cache.max_size is None:
        raise ConfigError("op=prune needs a cap: cache.max_size=<50GB, 500MiB, 80%> (or op=clear)")
    apply = op == "clear" or bool(cfg.apply)
    result = prune(cache.root, cache.max_size, runs_dir=cache.runs_dir, keep_runs=cache.keep_runs,
                   apply=apply and op != "list", everything=op == "clear", names=True)
    from .cache_lru import entries, mark_kept

    listing = mark_kept(entries(cache.root, names=True), cache.root, cache.runs_dir, cache.keep_runs)
    commands.print_cache(listing, result, op, cache.root, out=out)
    return Report({"op": op, "root": cache.root, "cap": cache.max_size, "total": sum(e.size for e in listing),
                   "entries": [e.as_dict() for e in reversed(listing)],
                   **({} if op == "list" else {"evicted": [e.as_dict() for e in result.evicted],
                                                "dry_run": result.dry_run, "total_after": result.total_after})})


def _pin(cfg: DictConfig, out: TextIO) -> Report:
    from .cache_lru import pin

    cache = open_cache(cfg)
    kind, oid = _local_or_resolved(cfg, cache)
    record = pin(cache.root, kind, oid, note=str(cfg.hash))
    print(f"pinned {kind.name} {oid} in {cache.root}: never evicted (task=unpin lets it go)", file=out)
    return Report(record)


def _unpin(cfg: DictConfig, out: TextIO) -> Report:
    from .cache_lru import pinned_hashes, unpin

    cache = open_cache(cfg)
    given = str(_need(cfg.hash, REF_HELP))
    matches = [h for h in pinned_hashes(cache.root) if h.startswith(given.lower())] if len(given) >= 8 else []
    if len(matches) > 1:
        raise ConfigError(f"hash prefix {given} matches {len(matches)} pins: give more digits")
    oid = matches[0] if matches else _local_or_resolved(cfg, cache)[1]
    if not unpin(cache.root, oid):
        raise ConfigError(f"{oid} is not pinned in {cache.root}")
    print(f"unpinned {oid}", file=out)
    return Report({"hash": oid, "unpinned": True})


def _local_or_resolved(cfg: DictConfig, cache: LocalCache) -> tuple[ArtifactKind, str]:
    """What ``hash=`` names: a full hash or 8+ hex prefix of an entry in this cache
    needs no backend; anything else (a name) is resolved through the store."""
    from .cache_lru import entries

    given = str(_need(cfg.hash, REF_HELP)).lower()
    if len(given) >= 8 and all(c in "0123456789abcdef" for c in given):
        local = [e for e in entries(cache.root) if e.oid.startswith(given)]
        if len({e.oid for e in local}) == 1:
            return kind_named(local[0].kind), local[0].oid
    store = build_store(cfg)
    found = _resolve(cfg, store, _kind(cfg))
    return found.kind or store.find_kind(found.oid), found.oid


# -- run tasks ----------------------------------------------------------------


# The overrides of a single run that slp composed itself (:mod:`.compose`), as Hydra
# records them; None under Hydra's main (a sweep), where HydraConfig has them.
single_run_overrides: list[str] | None = None


def job_overrides() -> list[str]:
    if single_run_overrides is not None:
        return list(single_run_overrides)
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # composed without Hydra's main (tests)
        return []


def multirun_job_dir() -> str | None:
    """This job's folder when running under ``-m`` (a sweep), else None."""
    if single_run_overrides is not None:
        return None
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return None
    return hc.runtime.output_dir if hc.mode == RunMode.MULTIRUN else None


def _run(cfg: DictConfig, out: TextIO) -> Report:
    from .bench import sweep
    from .pipeline import from_config

    job_dir = multirun_job_dir()
    if job_dir and cfg.resume:
        done = sweep.completed_result(job_dir)
        if done:
            print(f"job {os.path.basename(job_dir)} already completed (run {done.get('run_id')}): skipped", file=out)
            return Report(done)
    store = build_store(cfg)
    result = from_config.run_pipeline(cfg, store, open_cache(cfg), job_overrides(), out=out)
    if job_dir:
        sweep.write_job_result(job_dir, {"status": result.status, "run_id": result.run_id, "folder": result.folder,
                                         "overrides": job_overrides(), "stages": result.manifest["stages"]},
                               from_config.redactor(cfg, store))
    return Report(result)


def _reproduce(cfg: DictConfig, out: TextIO) -> Report:
    from .pipeline import from_config

    run_id = str(_need(cfg.run, "run=<run_id>"))
    _, comparison = from_config.reproduce(cfg, build_store(cfg), open_cache(cfg), run_id, out=out)
    return Report(comparison, ok=all(comparison.values()))


def _verify_run(cfg: DictConfig, out: TextIO) -> Report:
    from .pipeline.history import load_manifest, verify_run

    store = build_store(cfg)
    run_id = str(_need(cfg.run, "run=<run_id>"))
    manifest = load_manifest(run_id, cfg.runner.runs_dir, store)
    problems = verify_run(manifest, store, open_cache(cfg), out=out)
    return Report({"run": run_id, "ok": not problems, "problems": problems,
                   "artifacts": manifest.get("artifacts", {})}, ok=not problems)


def _runs(cfg: DictConfig, out: TextIO) -> Report:
    """List runs; op=finalize | clean settles the abandoned ones (all, or run=<id>)."""
    from .pipeline import from_config
    from .pipeline.history import find_runs, print_runs

    op = cfg.get("op")
    if not op:
        found = find_runs(cfg.runner.runs_dir, pipeline=cfg.pipeline.get("name") if cfg.get("pipeline") else None,
                          status=cfg.get("status"), since=cfg.get("since"), until=cfg.get("until"),
                          limit=cfg.limit, page=cfg.page)
        print_runs(found, out=out)
        return Report(found)
    from .pipeline.abandoned import settle_abandoned

    run_id = str(cfg.run) if cfg.get("run") else None
    return Report(settle_abandoned(cfg.runner.runs_dir, str(op), run_id, redactor=from_config.redactor(cfg)))


def _compare(cfg: DictConfig, out: TextIO) -> Report:
    from .pipeline.compare import compare, print_comparison

    result = compare(str(_need(cfg.run, "run=<run_id>")), str(_need(cfg.get("other"), "other=<run_id>")),
                     cfg.runner.runs_dir, build_store(cfg))
    print_comparison(result, out=out)
    return Report(result)


@dataclass(frozen=True)
class Task:
    run: Callable[[DictConfig, TextIO], Report]
    summary: str  # one line for ``slp --help``
    keys: tuple[str, ...] = ()  # the config keys it reads, for ``slp task=<name> --help``
    json: bool = False  # takes format=json


_BACKEND = ("backend",)
_PUT_KEYS = ("provenance", "sha256", "verify_upload", "verify_existing", "hash_ahead", "progress", "cache_dir") + _BACKEND
_GET_KEYS = ("hash", "out", "full_verify", "progress", "cache_dir") + _BACKEND

TASKS: dict[str, Task] = {
    "run": Task(_run, "run a pipeline (the default when pipeline=<name> is given)",
                ("pipeline", "runner", "model.hash", "prompts.hash", "infer", "engine", "resume") + _BACKEND),
    "put_model": Task(_put("model", MODEL), "store a GGUF model (reads its header), optionally named",
                      ("model.path", "model.name", "model.tag", "model.source") + _PUT_KEYS, json=True),
    "get_model": Task(_get(MODEL), "fetch a model by hash, prefix or name[:tag] through the verified cache",
                      _GET_KEYS, json=True),
    "put_prompts": Task(_put("prompts", PROMPTS), "store a JSONL prompt batch (checks every record), optionally named",
                        ("prompts.path", "prompts.name", "prompts.tag", "prompts.source") + _PUT_KEYS, json=True),
    "get_prompts": Task(_get(PROMPTS), "fetch a prompt batch by hash, prefix or name[:tag]", _GET_KEYS, json=True),
    "put": Task(_put(None), "store any file as kind=model|prompts|results|blob",
                ("kind", "path", "name", "tag") + _PUT_KEYS, json=True),
    "get": Task(_get(), "fetch any artifact by hash, prefix or name[:tag]", ("kind",) + _GET_KEYS, json=True),
    "show": Task(_show, "print an artifact's manifest", ("hash", "kind") + _BACKEND, json=True),
    "verify": Task(_verify, "re-hash a stored artifact and check its manifest (exit 1 if damaged)",
                   ("hash", "kind") + _BACKEND, json=True),
    "ls": Task(_ls, "list stored artifacts with name:tag, size and date", ("kind", "name") + _BACKEND, json=True),
    "tag": Task(_tag, "name a stored artifact: hash=<ref> name=<name[:tag]>", ("hash", "name", "tag", "kind")
                + _BACKEND, json=True),
    "untag": Task(_untag, "remove a name: name=<name:tag>", ("name", "tag") + _BACKEND, json=True),
    "cache": Task(_cache, "the local cache: op=list (default) | prune (to cache.max_size; apply=true deletes) | "
                  "clear", ("op", "apply", "cache", "cache_dir", "runner.runs_dir"), json=True),
    "pin": Task(_pin, "keep an artifact in the local cache whatever its cap: hash=<ref>", ("hash", "kind", "cache_dir")
                + _BACKEND, json=True),
    "unpin": Task(_unpin, "let a pinned artifact be evicted again: hash=<ref>", ("hash", "cache_dir"), json=True),
    "repair": Task(_repair, "replace a damaged or lost stored object from a good local copy",
                   ("hash", "path", "kind", "progress") + _BACKEND, json=True),
    "fsck": Task(_fsck, "check the store, the cache and the run folders; fix=true repairs",
                 ("fix", "sample", "grace", "cache_dir", "runner.runs_dir") + _BACKEND, json=True),
    "gc": Task(_gc, "delete stored objects no run, name or keep= refers to (a dry run; apply=true deletes)",
               ("apply", "keep_runs", "keep_since", "keep", "grace", "runner.runs_dir") + _BACKEND, json=True),
    "runs": Task(_runs, "list runs, newest first: pipeline=, status=, since=, until=, page= (op=finalize|clean "
                 "settles abandoned ones)", ("status", "since", "until", "limit", "page", "op", "run",
                                             "runner.runs_dir"), json=True),
    "compare": Task(_compare, "compare two runs: run=<id> other=<id>: config, metrics side by side, artifact hashes",
                    ("run", "other", "runner.runs_dir") + _BACKEND, json=True),
    "reproduce": Task(_reproduce, "re-run a run from its saved config and compare output hashes",
                      ("run", "runner") + _BACKEND, json=True),
    "verify_run": Task(_verify_run, "re-hash every artifact a run references", ("run", "cache_dir") + _BACKEND,
                       json=True),
}


def run_task(cfg: DictConfig, out: TextIO | None = None) -> Any:
    """Run the task a composed config names (callable from tests without Hydra's main).
    Returns the report's data; exits 1 (after printing it) when the task found damage.
    ``out``: where its report goes, ``sys.stdout`` as it is when called (a server's
    worker has its client's)."""
    out = sys.stdout if out is None else out
    task = cfg.get("task") or ("run" if cfg.get("pipeline") else None)
    if not task:
        raise ConfigError(f"no task given: add task=<{'|'.join(TASKS)}> (slp --help lists them)")
    if task not in TASKS:
        from difflib import get_close_matches

        close = get_close_matches(str(task), TASKS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown task {task!r} ({hint}choose from {', '.join(TASKS)})")
    fmt = cfg.get("format") or "text"
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    spec = TASKS[task]
    if fmt == "json" and not spec.json:
        raise ConfigError(f"task={task} has no format=json output")
    report = spec.run(cfg, io.StringIO() if fmt == "json" else out)
    if fmt == "json":
        out.write(to_json(report.data) + "\n")
        out.flush()
    if not report.ok:
        raise SystemExit(1)
    return report.data


def to_json(data: Any) -> str:
    import orjson

    def plain(obj: Any) -> Any:
        if isinstance(obj, ArtifactKind):
            return obj.name
        if hasattr(obj, "as_dict"):
            return obj.as_dict()
        if hasattr(obj, "__dataclass_fields__"):
            from dataclasses import asdict

            return asdict(obj)
        return str(obj)

    return orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=plain).decode()
