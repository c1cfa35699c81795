"""The edge between Hydra and the runner: turn a composed config into plain values."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import orjson
import yaml
from omegaconf import DictConfig, OmegaConf

from ..cache import LocalCache
from ..errors import ConfigError
from ..store import ArtifactStore
from .history import compare_runs, load_manifest, load_run_file
from .run import RunResult, execute
from .run_folder import REDACTED, redact
from .spec import Pipeline, build_pipeline


def pipeline_from_config(cfg: DictConfig) -> Pipeline:
    section = cfg.get("pipeline")
    if not section:
        raise ConfigError("no pipeline given: add pipeline=<name> (a file in conf/pipeline/)")
    stages = OmegaConf.to_container(section.get("stages"), resolve=True) if section.get("stages") else {}
    return build_pipeline(section.get("name") or "pipeline", stages)


def redacted_yaml(cfg: DictConfig) -> str:
    plain = OmegaConf.to_container(cfg, resolve=True)
    return yaml.safe_dump(redact(plain), sort_keys=False)


def run_options(cfg: DictConfig) -> dict[str, Any]:
    """Run-wide settings every stage may read (engine, ...): plain data."""
    engine = cfg.get("engine")
    return {"engine": OmegaConf.to_container(engine, resolve=True)} if engine else {}


def run_pipeline(cfg: DictConfig, store: ArtifactStore, cache: LocalCache, overrides: list[str],
                 *, force: bool | None = None, reproduces: str | None = None, out: TextIO = sys.stdout) -> RunResult:
    runner = cfg.runner
    return execute(
        pipeline_from_config(cfg), store, cache,
        config_yaml=redacted_yaml(cfg), overrides=overrides, runs_dir=runner.runs_dir,
        workers=runner.workers, force=runner.force if force is None else force, upload=runner.upload,
        options=run_options(cfg), reproduces=reproduces, out=out,
    )


def _unredact(saved: Any, current: Any) -> Any:
    """The saved config, with each redacted secret taken from the current config."""
    if isinstance(saved, dict):
        cur = current if isinstance(current, dict) else {}
        return {k: (cur.get(k) if v == REDACTED else _unredact(v, cur.get(k))) for k, v in saved.items()}
    return saved


def reproduce(cfg: DictConfig, store: ArtifactStore, cache: LocalCache, run_id: str,
              out: TextIO = sys.stdout) -> tuple[RunResult, dict[str, bool]]:
    """Re-run a run from its saved config (pinned hashes included), every stage forced,
    into a new run; report per output artifact whether the hash matches."""
    original = load_manifest(run_id, cfg.runner.runs_dir, store)
    saved = yaml.safe_load(load_run_file(run_id, "config.yaml", cfg.runner.runs_dir, store))
    current = OmegaConf.to_container(cfg, resolve=True)
    merged = _unredact(saved, current)
    merged["runner"] = current["runner"]  # where runs go is this machine's business
    merged["backend"] = current["backend"]
    overrides = [*orjson.loads(load_run_file(run_id, "overrides.yaml", cfg.runner.runs_dir, store)),
                 f"# reproduces {run_id}"]
    print(f"reproducing {run_id} ({original.get('pipeline')})", file=out)
    result = run_pipeline(OmegaConf.create(merged), store, cache, overrides, force=True, reproduces=run_id, out=out)
    comparison = compare_runs(original, result.manifest, out)
    return result, comparison
