"""One pipeline run from start to published run folder."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

from ..cache import LocalCache
from ..errors import RunFailed
from ..manifest import utc_now
from ..redaction import Redactor
from ..store import ArtifactStore
from .context import ArtifactRef
from .run_folder import RunFolder, new_run_id
from .runner import Runner, StageRecord
from .spec import Pipeline
from .system_info import system_info



@dataclass
class RunResult:
    run_id: str
    status: str
    folder: str
    manifest: dict[str, Any]
    records: dict[str, StageRecord]


def collect_artifacts(records: dict[str, StageRecord]) -> dict[str, dict]:
    """Every artifact a stage produced, named ``<stage>.<output>``."""
    out = {}
    for name, rec in records.items():
        for key, value in rec.outputs.items():
            if isinstance(value, ArtifactRef):
                out[f"{name}.{key}"] = {"kind": value.kind.name, "hash": value.oid, "size_bytes": value.size}
    return out


def execute(
    pipeline: Pipeline,
    store: ArtifactStore,
    cache: LocalCache,
    *,
    config_yaml: str,
    overrides: list[str],
    runs_dir: str = "runs",
    workers: int = 4,
    force: bool = False,
    upload: bool = True,
    options: dict | None = None,
    reproduces: str | None = None,
    references: dict[str, dict] | None = None,
    redactor: Redactor | None = None,
    out: TextIO = sys.stdout,
) -> RunResult:
    """Run ``pipeline``, write its immutable run folder, publish it, and return the result.

    ``config_yaml`` must already have its secret-named keys masked; ``redactor``
    (default: the secrets of this process's environment and of the store's backend)
    then scrubs every file of the folder, the returned manifest and the error.
    Raises RunFailed (after the folder is written) when a stage failed.
    KeyboardInterrupt (Ctrl-C, or a stop signal as :class:`~slp_runner.errors.Interrupted`)
    leaves a folder marked interrupted with the signal's name, finalized and published
    (a failed upload is one line: the local folder stays), then is raised again.
    """
    redactor = redactor or Redactor(fs=store.backend.fs)
    # Made first: a bad setting (workers=abc) fails before any folder exists.
    runner = Runner(store, cache, workers=workers, force=force, options=options, redactor=redactor)
    # By value in the parsed tree, not the text: a bare *** is no YAML scalar.
    config_yaml = yaml.safe_dump(redactor.tree(yaml.safe_load(config_yaml), names=False), sort_keys=False)
    run_id = new_run_id(config_yaml.encode())
    folder = RunFolder(runs_dir, run_id)
    folder.write_bytes("config.yaml", config_yaml.encode())
    folder.write_json("overrides.yaml", redactor.overrides(overrides))  # JSON is YAML
    start, t0 = utc_now(), time.perf_counter()
    print(f"run {run_id}: pipeline {pipeline.name}, {len(pipeline.stages)} stages, backend {store.backend.name}",
          file=out, flush=True)
    status = "completed"
    records: dict[str, StageRecord] = {}
    interrupted: KeyboardInterrupt | None = None
    try:
        records = runner.run(pipeline, folder.staging, run_id, final_dir=folder.final)
    except KeyboardInterrupt as exc:
        interrupted, status = exc, "interrupted"
        records = runner.records  # completed stages keep their results
    if interrupted is None and any(r.status != "completed" for r in records.values()):
        status = "failed"
    manifest = {
        "run_id": run_id,
        "pipeline": pipeline.name,
        "status": status,
        "start_time": start,
        "end_time": utc_now(),
        "total_latency_ms": round((time.perf_counter() - t0) * 1000, 3),
        "backend": {"name": store.backend.name, "location": store.backend.location},
        "artifacts": collect_artifacts(records),
        "stages": {name: rec.to_json() for name, rec in records.items()},
        "overrides": redactor.overrides(overrides),
        "system": system_info(os.getcwd()),  # the git commit of the project the user runs from
    }
    if interrupted is not None:
        manifest["signal"] = signal.Signals(getattr(interrupted, "signum", signal.SIGINT)).name
    if reproduces:
        manifest["reproduces"] = reproduces
    if references:  # names and short hashes the config gave, and the full hash each was run with
        manifest["references"] = references
    manifest = redactor.tree(manifest, names=False)  # stage errors, inputs, outputs, metrics
    folder.write_json("metrics.json", {name: st["metrics"] for name, st in manifest["stages"].items()})
    folder.write_json("manifest.json", manifest)
    final = folder.finalize(redactor)  # logs and stage files too
    _print_summary(manifest, final, out)
    cache.release()  # the run is over: what its stages fetched may be evicted again
    if upload:
        try:
            n = folder.upload(store)
        except Exception as exc:
            if interrupted is None:
                raise
            # Stopping: the local folder is whole, so say why the backend lacks it and go on.
            print(f"run {run_id} not published ({redactor.text(_first_line(exc))}); the run folder stays at {final}",
                  file=out, flush=True)
        else:
            print(f"published {n} files to {store.backend.location.rstrip('/')}/runs/{run_id}/", file=out, flush=True)
    if interrupted is not None:
        raise interrupted
    result = RunResult(run_id, status, final, manifest, records)
    if status != "completed":
        failed = [f"{n}: {st['error']}" for n, st in manifest["stages"].items() if st["status"] == "failed"]
        raise RunFailed(f"run {run_id} failed ({'; '.join(failed)[:500]}); folder {final}")
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cache_label(stage: dict) -> str:
    """How a stage of a manifest was served: ``stage`` (an identical earlier execution
    was reused), ``local`` (it ran, the artifact came from the local cache), ``miss``,
    or its status when it did not complete."""
    if stage["status"] != "completed":
        return stage["status"]
    if stage["cache_hit"]:
        return "stage"
    return "local" if (stage.get("metrics") or {}).get("cache_hit") else "miss"


def _print_summary(manifest: dict, folder: str, out: TextIO) -> None:
    total = manifest["total_latency_ms"] or 1.0
    print(f"{'Stage':28} | {'Latency':>10} | {'% Total':>7} | cache", file=out)
    print(f"{'-' * 28}-|-{'-' * 10}-|-{'-' * 7}-|------", file=out)
    for name, st in manifest["stages"].items():
        pct = 100 * st["latency_ms"] / total
        hit = cache_label(st)
        print(f"{name:28} | {st['latency_ms'] / 1000:>9.3f}s | {pct:>6.1f}% | {hit}", file=out)
    print(f"{'Total':28} | {total / 1000:>9.3f}s | {100.0:>6.1f}% |", file=out)
    for name, st in manifest["stages"].items():
        m = st.get("metrics") or {}
        if "tokens_per_sec" in m:
            lat = m.get("latency_ms") or {}
            print(f"{name}: {m['prompts_processed']} prompts ok, {m['prompts_failed']} failed, "
                  f"{m['tokens_generated']} tokens, {m['tokens_per_sec']} tokens/s, "
                  f"latency p50 {lat.get('p50', 0):.0f} ms / p95 {lat.get('p95', 0):.0f} ms", file=out)
        if "model_load_ms" in m and m.get("engine") == "managed":
            print(f"{name}: model loaded in {m['model_load_ms']:.0f} ms", file=out)
    print(f"run {manifest['run_id']} {manifest['status']}: {folder}", file=out, flush=True)
