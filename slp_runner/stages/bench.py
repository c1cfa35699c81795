"""Benchmark stages: storage operations on the run's backend, with references."""

from __future__ import annotations

from ..bench.storage import run_storage_bench
from ..pipeline.context import StageContext


def bench_storage(ctx: StageContext, op: str = "upload", size_mb: float = 16, iterations: int = 5, warmup: int = 1,
                  reference: bool = True, min_seconds: float = 0.0, max_iterations: int = 50) -> dict:
    """The seed's slp_bench_storage; everything measured goes into the stage metrics.
    The ``cli_*`` ops' slp processes get the backend overrides this run was given."""
    from ..tasks import job_overrides

    metrics = run_storage_bench(ctx.store, op=op, size_mb=size_mb, iterations=iterations, warmup=warmup,
                                reference=reference, overrides=job_overrides(), min_seconds=min_seconds,
                                max_iterations=max_iterations)
    ctx.metrics.update(metrics)
    s = metrics["slp"]
    ctx.log.info("%s %s %s MiB: %s MiB/s (%s), ratio to %s: %s", op, ctx.store.backend.name, size_mb,
                 s["throughput_mib_s"], s["latency_ms"], metrics.get("reference", {}).get("tool"),
                 metrics.get("ratio_to_reference"))
    return {"throughput_mib_s": s["throughput_mib_s"], "ratio_to_reference": metrics.get("ratio_to_reference")}
