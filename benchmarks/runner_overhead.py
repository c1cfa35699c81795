"""Runner overhead: a 100-stage no-op graph, and a fully cached re-run of put/get of the
real Gemma GGUF, both through the `slp` command as a user runs it.

    python -m benchmarks.runner_overhead

Overhead = wall time of `slp` minus the time spent inside stage functions. Results:
``runs/bench-runner-<time>/summary.md``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import orjson
import yaml

from benchmarks._report import out_dir, publish

SLP = os.path.join(os.path.dirname(sys.executable), "slp")


def noop_pipeline(lanes: int = 10, depth: int = 10, cache: bool = False) -> dict:
    """``lanes`` independent chains of ``depth`` no-op stages (100 by default)."""
    stages = {}
    for lane in range(lanes):
        for step in range(depth):
            name = f"s{lane}_{step}"
            stage = {"_target_": "slp_runner.stages.builtin.noop", "cache": cache, "params": {"lane": lane}}
            if step:
                stage["inputs"] = {"after": f"@s{lane}_{step - 1}.done"}
            stages[name] = stage
    return {"name": "noop100", "stages": stages}


def timed_slp(args: list[str], env: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([SLP, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    runs_dir = [a.split("=", 1)[1] for a in args if a.startswith("runner.runs_dir=")][0]
    newest = sorted(d for d in os.listdir(runs_dir) if d.startswith("run-"))[-1]
    with open(os.path.join(runs_dir, newest, "manifest.json"), "rb") as f:
        return wall, orjson.loads(f.read())


def main() -> int:
    work = tempfile.mkdtemp(prefix="slp-bench-runner-")
    conf = os.path.join(work, "conf", "pipeline")
    os.makedirs(conf)
    with open(os.path.join(conf, "noop100.yaml"), "w") as f:
        yaml.safe_dump(noop_pipeline(), f)
    env = dict(os.environ, SLP_STORE_ROOT=os.path.join(work, "store"), SLP_CACHE_DIR=os.path.join(work, "cache"))
    runs = os.path.join(work, "runs")
    common = [f"hydra.searchpath=[file://{os.path.join(work, 'conf')}]", f"runner.runs_dir={runs}"]

    t0 = time.perf_counter()
    subprocess.run([SLP, "task=runs", f"runner.runs_dir={runs}"], env=env, capture_output=True, check=True)
    startup = time.perf_counter() - t0

    rows = []
    for label, extra in [("noop100, 1 worker", ["runner.workers=1"]), ("noop100, 4 workers", ["runner.workers=4"])]:
        samples = []
        for _ in range(3):
            wall, m = timed_slp([*common, "pipeline=noop100", *extra], env)
            stage_s = sum(s["latency_ms"] for s in m["stages"].values()) / 1000
            samples.append((wall, m["total_latency_ms"] / 1000, stage_s))
        wall, total, stage_s = (statistics.median(x[i] for x in samples) for i in range(3))
        rows.append((label, wall, total, stage_s))

    # fully cached re-run of put/get with the real Gemma GGUF
    gemma_args = ["pipeline=put_get_model", f"runner.runs_dir={runs}"]
    cold_wall, cold = timed_slp(gemma_args, env)
    warm = [timed_slp(gemma_args, env) for _ in range(3)]
    warm_wall = statistics.median(w for w, _ in warm)
    warm_m = warm[-1][1]
    assert all(s["cache_hit"] for s in warm_m["stages"].values())

    lines = ["# Runner overhead (through the `slp` command, median of 3)", "",
             f"`slp task=runs` (interpreter + imports + Hydra compose, no pipeline): {startup:.3f} s", "",
             "| graph | wall s | inside stages s (summed) | overhead = wall - stages s | scheduling (run total - stages, 1 worker) ms | after the run (folder, system info, publish) s |",
             "|---|---|---|---|---|---|"]
    for label, wall, total, stage_s in rows:
        sched = f"{1000 * (total - stage_s):.1f}" if "1 worker" in label else "-"
        lines.append(f"| {label} | {wall:.3f} | {stage_s:.3f} | {wall - stage_s:.3f} | {sched} | "
                     f"{wall - startup - total:.3f} |")
    lines += ["", "| put_get_model, real Gemma 3 270M (253 MB) | wall s | manifest total s |", "|---|---|---|",
              f"| cold (hash + store + fetch into cache) | {cold_wall:.3f} | {cold['total_latency_ms'] / 1000:.3f} |",
              f"| fully cached re-run | {warm_wall:.3f} | {warm_m['total_latency_ms'] / 1000:.3f} |"]
    publish(out_dir("runner"), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
