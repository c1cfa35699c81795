"""The edge between Hydra and the runner: turn a composed config into plain values."""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

import orjson
import yaml
from omegaconf import DictConfig, OmegaConf

from ..artifacts import MODEL, PROMPTS
from ..cache import LocalCache
from ..errors import ConfigError
from ..redaction import REDACTED, Redactor, mask_names
from ..store import ArtifactStore
from .history import compare_runs, load_manifest, load_run_file
from .run import RunResult, execute
from .spec import Pipeline, build_pipeline

FULL_HASH = re.compile(r"[0-9a-f]{64}")


def pipeline_from_config(cfg: DictConfig) -> Pipeline:
    section = cfg.get("pipeline")
    if not section:
        raise ConfigError("no pipeline given: add pipeline=<name> (a file in slp_runner/conf/pipeline/)")
    stages = OmegaConf.to_container(section.get("stages"), resolve=True) if section.get("stages") else {}
    return build_pipeline(section.get("name") or "pipeline", stages)


def redacted_yaml(cfg: DictConfig) -> str:
    plain = OmegaConf.to_container(cfg, resolve=True)
    return yaml.safe_dump(mask_names(plain), sort_keys=False)


def redactor(cfg: DictConfig, store: ArtifactStore | None = None) -> Redactor:
    """The secrets a run of ``cfg`` must keep out of its files: the config's, the
    environment's, and the credentials of the store's backend."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)  # a callback's config holds Hydra's own node, not all resolvable
    try:
        tree = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except Exception:  # a broken interpolation is reported elsewhere; keep what is literal
        tree = raw
    return Redactor(config=tree, fs=store.backend.fs if store is not None else None)


def run_options(cfg: DictConfig) -> dict[str, Any]:
    """Run-wide settings every stage may read (engine, ...): plain data."""
    engine = cfg.get("engine")
    return {"engine": OmegaConf.to_container(engine, resolve=True)} if engine else {}


def _stage_kind(stage: DictConfig):
    from ..artifacts import MODEL, PROMPTS, kind_named

    target = str(stage.get("_target_") or "")
    if target.endswith(".get_model"):
        return MODEL
    if target.endswith(".get_prompts"):
        return PROMPTS
    kind = (stage.get("inputs") or {}).get("kind")
    return kind_named(kind) if isinstance(kind, str) else None


def resolve_references(cfg: DictConfig, store: ArtifactStore) -> dict[str, dict]:
    """Turn each name or short hash the config gives (model.hash, prompts.hash, a
    stage's literal ``hash`` input) into the full hash, in the config itself: the
    saved config.yaml, the stage-cache keys and a later reproduction all see the hash,
    never a name that may since point elsewhere. Returns what was resolved, by key."""
    from ..refs import resolve

    found: dict[str, dict] = {}

    def settle(key: str, kind) -> None:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and value and not value.startswith("@") and not FULL_HASH.fullmatch(value):
            ref = resolve(store, value, kind)
            OmegaConf.update(cfg, key, ref.oid, merge=False)
            found[key] = ref.as_dict()

    settle("model.hash", MODEL)
    settle("prompts.hash", PROMPTS)
    stages = cfg.pipeline.get("stages") if cfg.get("pipeline") else None
    for name in stages or {}:
        inputs = stages[name].get("inputs")
        if not isinstance(inputs, DictConfig) or "hash" not in inputs:
            continue
        if OmegaConf.is_interpolation(inputs, "hash"):
            if inputs.get("hash") in (None, ""):  # fail now, not after the engine has loaded a model
                source = OmegaConf.to_container(inputs, resolve=False)["hash"].strip("${}")
                raise ConfigError(f"missing {source}=<hash, 8+ hex prefix or name[:tag]> (stage {name!r} fetches it)")
        else:
            settle(f"pipeline.stages.{name}.inputs.hash", _stage_kind(stages[name]))
    return found


def run_pipeline(cfg: DictConfig, store: ArtifactStore, cache: LocalCache, overrides: list[str],
                 *, force: bool | None = None, reproduces: str | None = None, out: TextIO = sys.stdout) -> RunResult:
    runner = cfg.runner
    references = resolve_references(cfg, store)
    return execute(
        pipeline_from_config(cfg), store, cache, references=references,
        config_yaml=redacted_yaml(cfg), overrides=overrides, runs_dir=runner.runs_dir,
        workers=runner.workers, force=runner.force if force is None else force, upload=runner.upload,
        options=run_options(cfg), reproduces=reproduces, redactor=redactor(cfg, store), out=out,
    )


def _unredact(saved: Any, current: Any) -> Any:
    """The saved config, with each redacted value (a secret, or a string a secret was
    masked in) taken from the current config."""
    if isinstance(saved, dict):
        cur = current if isinstance(current, dict) else {}
        return {k: (cur.get(k) if v == REDACTED else cur.get(k, v) if isinstance(v, str) and REDACTED in v
                    else _unredact(v, cur.get(k))) for k, v in saved.items()}
    return saved


def _unredact_overrides(saved: list[str], current: Any) -> list[str]:
    """``backend.secret=***`` -> ``backend.secret=<its value in the current config>``
    (the new run masks it again); an override naming nothing current stays masked."""
    out = []
    for o in saved:
        key, sep, value = o.partition("=")
        node: Any = current
        for part in key.lstrip("+~").split("@", 1)[0].split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out.append(f"{key}={node}" if sep and REDACTED in value and isinstance(node, (str, int, float)) else o)
    return out


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
    saved_overrides = orjson.loads(load_run_file(run_id, "overrides.yaml", cfg.runner.runs_dir, store))
    overrides = [*_unredact_overrides(saved_overrides, current), f"# reproduces {run_id}"]
    print(f"reproducing {run_id} ({original.get('pipeline')})", file=out)
    result = run_pipeline(OmegaConf.create(merged), store, cache, overrides, force=True, reproduces=run_id, out=out)
    comparison = compare_runs(original, result.manifest, out)
    return result, comparison
