"""Run a validated :class:`Pipeline` on a store: independent stages in a bounded
thread pool, the stage cache consulted first, failures contained to what depends
on them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from ..cache import LocalCache
from ..errors import ConfigError, SlpError
from ..manifest import utc_now
from ..redaction import Redactor
from ..store import ArtifactStore
from .context import StageContext, to_json
from .spec import Pipeline, Ref, StageSpec
from .stage_cache import StageCache, stage_key


@dataclass
class StageRecord:
    name: str
    status: str = "pending"  # completed | failed | skipped | interrupted
    cache_hit: bool = False
    latency_ms: float = 0.0
    started_at: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    key: str | None = None
    target: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    code: dict[str, Any] = field(default_factory=dict)  # the target's code fingerprint

    def to_json(self) -> dict:
        return {
            "status": self.status, "target": self.target, "code": self.code, "cache_hit": self.cache_hit,
            "latency_ms": round(self.latency_ms, 3), "started_at": self.started_at, "key": self.key,
            "inputs": to_json(self.inputs), "outputs": to_json(self.outputs), "metrics": self.metrics,
            **({"error": self.error} if self.error else {}),
        }


class Runner:
    """Execute pipelines; the stage functions never see this class.

    workers: how many independent stages may run at once.
    force: ignore the stage cache (every stage runs; results are recorded anew).
    options: run-wide settings handed to every stage as ``ctx.options``.
    redactor: scrubs secrets from the stage cache records this runner writes.
    """

    def __init__(self, store: ArtifactStore, cache: LocalCache, *, workers: int = 4, force: bool = False,
                 use_stage_cache: bool = True, options: dict | None = None, redactor: Redactor | None = None):
        self.store = store
        self.cache = cache
        try:
            self.workers = max(1, int(workers))
        except (TypeError, ValueError):
            raise ConfigError(f"runner.workers must be a whole number, got {workers!r}") from None
        self.force = force
        self.stage_cache = StageCache(store, redactor, cache) if use_stage_cache else None
        self.options = options or {}
        self.records: dict[str, StageRecord] = {}

    def run(self, pipeline: Pipeline, run_dir: str, run_id: str, final_dir: str | None = None) -> dict[str, StageRecord]:
        """Run every stage; return a record per stage. KeyboardInterrupt propagates
        after the records of unfinished stages are marked ``interrupted``.

        run_dir: where stages write now; final_dir: where that folder will be moved.
        """
        self._moves_to = (run_dir, final_dir) if final_dir else None
        records = {name: StageRecord(name, target=spec.target, code=spec.code)
                   for name, spec in pipeline.stages.items()}
        self.records = records  # readable after an interrupt
        sorter = pipeline.sorter()
        sorter.prepare()
        running: dict[Future, str] = {}
        os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="slp-stage")
        # Not `with`: on Ctrl-C the pool must not wait for stages still running.
        self.resources = contextlib.ExitStack()  # what stages start for the whole run (an engine)
        try:
            while sorter.is_active():
                for name in sorter.get_ready():
                    blocked = [r.stage for r in pipeline.stages[name].refs()
                               if records[r.stage].status != "completed"]
                    if blocked:
                        records[name].status = "skipped"
                        records[name].error = f"upstream stage {blocked[0]!r} did not complete"
                        sorter.done(name)
                        continue
                    spec = pipeline.stages[name]
                    running[pool.submit(self._run_stage, spec, records, run_dir, run_id)] = name
                if not running:
                    continue
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    name = running.pop(fut)
                    fut.result()  # _run_stage records its own errors; this only re-raises interrupts
                    sorter.done(name)
        except KeyboardInterrupt:
            for rec in records.values():
                if rec.status in ("pending", "running"):
                    rec.status = "interrupted"
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            self.resources.close()  # a managed engine stops here, whatever happened
        pool.shutdown(wait=True)
        return records

    def _run_stage(self, spec: StageSpec, records: dict[str, StageRecord], run_dir: str, run_id: str) -> None:
        rec = records[spec.name]
        rec.status = "running"
        rec.started_at = utc_now()
        t0 = time.perf_counter()
        log, handler = _stage_logger(run_id, spec.name, os.path.join(run_dir, "logs", f"{spec.name}.log"))
        try:
            kwargs = dict(spec.params)
            for key, value in spec.inputs.items():
                if isinstance(value, Ref):
                    upstream = records[value.stage].outputs
                    if value.output not in upstream:
                        raise SlpError(f"stage {spec.name!r}: upstream {value} has no output {value.output!r} "
                                       f"(it has {sorted(upstream)})")
                    value = upstream[value.output]
                kwargs[key] = value
            rec.inputs = {k: kwargs[k] for k in spec.inputs}
            rec.key = stage_key(spec, kwargs, self.cache)
            # A stage with a side effect beyond its outputs (a put that names its artifact:
            # the name may have moved since) runs every time; its put then deduplicates.
            uncached = any(kwargs.get(k) for k in getattr(spec.fn, "slp_uncached_when", ()))
            if self.stage_cache is not None and spec.cache and not self.force and not uncached:
                hit = self.stage_cache.lookup(spec, rec.key)
                if hit is not None:
                    rec.outputs, rec.metrics, rec.cache_hit = hit["outputs"], hit.get("metrics", {}), True
                    rec.metrics["cached_from_run"] = hit.get("run_id")
                    log.info("stage cache hit %s (from run %s)", rec.key, hit.get("run_id"))
                    rec.status = "completed"
                    return
            ctx = StageContext(spec.name, self.store, self.cache, run_dir, log, options=self.options,
                               resources=self.resources)
            log.info("running %s", spec.target)
            outputs = spec.fn(ctx, **kwargs)
            if outputs is None:
                outputs = {}
            if not isinstance(outputs, dict):
                raise SlpError(f"stage {spec.name!r}: {spec.target} returned {type(outputs).__name__}, not a dict")
            rec.outputs, rec.metrics = outputs, ctx.metrics
            if self.stage_cache is not None and spec.cache:
                self.stage_cache.record(rec.key, spec, outputs, ctx.metrics, run_id, self._moves_to)
            rec.status = "completed"
            log.info("completed")
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, SlpError) else str(exc)
            log.error("failed: %s\n%s", error, traceback.format_exc())
            if rec.status != "interrupted":  # else it failed because the run is stopping (its engine went)
                rec.status, rec.error = "failed", error
        finally:
            rec.latency_ms = (time.perf_counter() - t0) * 1000
            log.removeHandler(handler)
            handler.close()


def _stage_logger(run_id: str, stage: str, path: str) -> tuple[logging.Logger, logging.Handler]:
    log = logging.getLogger(f"slp.run.{run_id}.{stage}")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return log, handler
