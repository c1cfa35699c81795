"""The types of the top-level config, as a structured-config schema.

``conf/config.yaml`` holds the values and says what each key means; this schema
says what type each is, so Hydra converts and checks a command line when it
composes: ``runner.force=no`` is False (not the true-ish string "no"),
``runner.workers=abc`` is one error naming the key, and a misspelt key is refused.
Groups (backend, engine, pipeline) differ per choice and are typed by their files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

SCHEMA_NAME = "slp_schema"


@dataclass
class RunnerConf:
    workers: int = 4
    force: bool = False
    runs_dir: str = "runs"
    upload: bool = True


@dataclass
class ArtifactArgs:  # model.*, prompts.*
    path: Optional[str] = None
    name: Optional[str] = None
    tag: Optional[str] = None
    source: Optional[str] = None
    hash: Optional[str] = None


@dataclass
class InferConf:
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 42
    concurrency: Optional[int] = None
    timeout: float = 120.0
    stream: bool = True


@dataclass
class BenchConf:
    # upload | download | roundtrip | hash | cache (in-process); cli_get | cli_put | cli_hit | cli_ls
    # (whole slp processes); checked by the benchmark, so that a sweep records a bad one as a failed job
    op: str = "upload"
    size_mb: Any = 16  # a number; kept as given (16, not 16.0) for the sweep's tables
    # recorded iterations (each a median or mean over them), after `warmup` unrecorded ones: at
    # least `iterations`; in-process ops run more, up to `max_iterations`, until slp's add up
    # to `min_seconds` (timeit's autorange)
    iterations: int = 5
    min_seconds: float = 2.0
    max_iterations: int = 50
    warmup: int = 1
    # also time the reference tool in the same run, alternating iterations with slp
    reference: bool = True


@dataclass
class CacheConf:
    max_size: Optional[str] = None  # 50GB, 500MiB, 80%, or bytes
    keep_runs: Optional[int] = None


@dataclass
class SlpConfig:
    backend: Any = None
    pipeline: Any = None
    engine: Any = None
    task: Optional[str] = None
    format: str = "text"
    run: Optional[str] = None
    other: Optional[str] = None
    op: Optional[str] = None
    status: Optional[str] = None
    since: Optional[str] = None
    until: Optional[str] = None
    limit: int = 20
    page: int = 1
    runner: RunnerConf = field(default_factory=RunnerConf)
    model: ArtifactArgs = field(default_factory=ArtifactArgs)
    prompts: ArtifactArgs = field(default_factory=ArtifactArgs)
    infer: InferConf = field(default_factory=InferConf)
    bench: BenchConf = field(default_factory=BenchConf)
    resume: bool = False
    kind: Optional[str] = None
    path: Optional[str] = None
    hash: Optional[str] = None
    name: Optional[str] = None
    tag: Optional[str] = None
    out: Optional[str] = None
    provenance: Dict[str, Any] = field(default_factory=dict)
    sha256: bool = False
    verify_upload: str = "size"
    verify_existing: str = "size"
    hash_ahead: Any = "auto"  # auto | true | false
    full_verify: bool = False
    fix: bool = False
    sample: float = 0.0
    grace: str = "24h"
    keep_runs: Optional[int] = None
    keep_since: Optional[str] = None
    keep: Any = field(default_factory=list)  # one reference, or a list of them
    progress: Any = "auto"  # auto | true | false
    cache_dir: str = "~/.cache/slp-runner"
    cache: CacheConf = field(default_factory=CacheConf)
    apply: bool = False


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=SlpConfig)
