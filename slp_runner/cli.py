"""The ``slp`` command: Hydra at the edge, plain functions behind it.

    slp task=put_model model.path=gemma.gguf model.name=gemma3-270m
    slp task=get_model hash=<blake3> out=model.gguf backend=seaweedfs
    slp task=put_prompts prompts.path=prompts.jsonl backend=s3
    slp pipeline=put_get_model backend=seaweedfs     # a declared pipeline (conf/pipeline/)
    slp task=reproduce run=<run_id>                  # re-run it, compare output hashes
    slp task=verify_run run=<run_id>                 # re-hash every artifact it references
    slp task=runs                                    # recent runs

Errors a user can cause print one line, ``slp: error: ...``, and exit 1.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import commands
from .artifacts import MODEL, PROMPTS, RESULTS, KINDS, kind_named
from .backends import Backend
from .cache import LocalCache
from .errors import ConfigError, SlpError
from .examples import register_resolvers
from .bench import sweep
from .pipeline import from_config
from .pipeline.history import list_runs, load_manifest, verify_run
from .store import ArtifactStore

register_resolvers()

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def build_backend(cfg: DictConfig) -> Backend:
    if "_target_" not in cfg.backend:
        raise ConfigError("backend config has no _target_")
    return instantiate(cfg.backend, _convert_="all")


def build_store(cfg: DictConfig) -> ArtifactStore:
    return ArtifactStore(build_backend(cfg), verify_upload=cfg.verify_upload)


def _provenance(cfg: DictConfig) -> dict[str, Any]:
    prov = cfg.get("provenance") or {}
    return OmegaConf.to_container(prov, resolve=True) if isinstance(prov, DictConfig) else dict(prov)


def _need(value: Any, what: str) -> Any:
    if value in (None, ""):
        raise ConfigError(f"missing {what}")
    return value


def _put(kind_cfg_key: str | None, kind_fixed=None) -> Callable[[DictConfig], Any]:
    def run(cfg: DictConfig):
        store = build_store(cfg)
        if kind_fixed is not None:
            section = cfg[kind_cfg_key]
            path = _need(section.path, f"{kind_cfg_key}.path=<file>")
            return commands.put(store, kind_fixed, path, name=section.get("name"), source=section.get("source"),
                                provenance=_provenance(cfg), sha256=cfg.sha256, progress=cfg.progress)
        kind = kind_named(_need(cfg.kind, "kind=<" + "|".join(KINDS) + ">"))
        path = _need(cfg.path, "path=<file>")
        return commands.put(store, kind, path, provenance=_provenance(cfg), sha256=cfg.sha256, progress=cfg.progress)

    return run


def _get(kind_fixed=None) -> Callable[[DictConfig], Any]:
    def run(cfg: DictConfig):
        oid = _need(cfg.hash, "hash=<blake3>")
        kind = kind_fixed or (kind_named(cfg.kind) if cfg.kind else None)
        return commands.get(build_store(cfg), LocalCache(cfg.cache_dir), kind, str(oid), dest=cfg.out,
                            full_verify=cfg.full_verify, progress=cfg.progress)

    return run


def _show(cfg: DictConfig):
    kind = kind_named(cfg.kind) if cfg.kind else None
    return commands.show(build_store(cfg), kind, str(_need(cfg.hash, "hash=<blake3>")))


def _verify(cfg: DictConfig):
    kind = kind_named(cfg.kind) if cfg.kind else None
    if not commands.verify(build_store(cfg), kind, str(_need(cfg.hash, "hash=<blake3>"))):
        raise SystemExit(1)


def _ls(cfg: DictConfig):
    kinds = [kind_named(cfg.kind)] if cfg.kind else [MODEL, PROMPTS, RESULTS]
    return commands.list_artifacts(build_store(cfg), kinds)


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # composed without Hydra's main (tests)
        return []


def _multirun_job_dir() -> str | None:
    """This job's folder when running under ``-m`` (a sweep), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return None
    return hc.runtime.output_dir if hc.mode == RunMode.MULTIRUN else None


def _run(cfg: DictConfig):
    job_dir = _multirun_job_dir()
    if job_dir and cfg.resume:
        done = sweep.completed_result(job_dir)
        if done:
            print(f"job {os.path.basename(job_dir)} already completed (run {done.get('run_id')}): skipped")
            return done
    store = build_store(cfg)
    result = from_config.run_pipeline(cfg, store, LocalCache(cfg.cache_dir), _overrides())
    if job_dir:
        sweep.write_job_result(job_dir, {"status": result.status, "run_id": result.run_id, "folder": result.folder,
                                         "overrides": _overrides(), "stages": result.manifest["stages"]})
    return result


def _reproduce(cfg: DictConfig):
    run_id = str(_need(cfg.run, "run=<run_id>"))
    _, comparison = from_config.reproduce(cfg, build_store(cfg), LocalCache(cfg.cache_dir), run_id)
    if not all(comparison.values()):
        raise SystemExit(1)
    return comparison


def _verify_run(cfg: DictConfig):
    store = build_store(cfg)
    manifest = load_manifest(str(_need(cfg.run, "run=<run_id>")), cfg.runner.runs_dir, store)
    problems = verify_run(manifest, store, LocalCache(cfg.cache_dir))
    if problems:
        raise SystemExit(1)
    return problems


def _runs(cfg: DictConfig):
    return list_runs(cfg.runner.runs_dir)


TASKS: dict[str, Callable[[DictConfig], Any]] = {
    "run": _run,
    "reproduce": _reproduce,
    "verify_run": _verify_run,
    "runs": _runs,
    "put_model": _put("model", MODEL),
    "get_model": _get(MODEL),
    "put_prompts": _put("prompts", PROMPTS),
    "get_prompts": _get(PROMPTS),
    "put": _put(None),
    "get": _get(),
    "show": _show,
    "verify": _verify,
    "ls": _ls,
}


def run_task(cfg: DictConfig) -> Any:
    """Run the task a composed config names (callable from tests without Hydra's main)."""
    task = cfg.get("task") or ("run" if cfg.get("pipeline") else None)
    if not task:
        raise ConfigError(f"no task given: add task=<{'|'.join(TASKS)}>")
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    return TASKS[task](cfg)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run_task(cfg)
    except SlpError as exc:
        print(f"slp: error: {exc}", file=sys.stderr)
        job_dir = _multirun_job_dir()
        if job_dir:  # one failed job of a sweep: record it, let the others run
            sweep.write_job_result(job_dir, {"status": "failed", "error": str(exc), "overrides": _overrides()})
            return
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("slp: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Stage threads may still be inside a long call; the run folder is already
        # written and marked interrupted, so exit without waiting for them.
        os._exit(130)


def _search_dirs(argv: list[str]) -> list[str]:
    dirs = [CONF_DIR]
    for arg in argv:
        if arg.startswith("hydra.searchpath="):
            dirs += [p.strip()[len("file://"):] for p in arg.split("=", 1)[1].strip("[]").split(",")
                     if p.strip().startswith("file://")]
    return dirs


def check_group_choices(argv: list[str]) -> None:
    """Name an unknown config choice (``backend=nope``) in one line, before Hydra's page of text."""
    dirs = _search_dirs(argv)
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or "." in key or "/" in key or not value or "," in value:
            continue
        groups = [os.path.join(d, key) for d in dirs if os.path.isdir(os.path.join(d, key))]
        if groups and not any(os.path.exists(os.path.join(g, f"{value}.yaml")) for g in groups):
            choices = sorted({f[:-5] for g in groups for f in os.listdir(g) if f.endswith(".yaml")})
            raise ConfigError(f"unknown {key} {value!r} (choose from {', '.join(choices)})")


def main() -> None:
    try:
        check_group_choices(sys.argv[1:])
    except SlpError as exc:
        print(f"slp: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    _hydra_main()


if __name__ == "__main__":
    main()
