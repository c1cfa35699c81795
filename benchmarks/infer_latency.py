"""run_infer end to end on SeaweedFS, cold and warm local cache, as the seed's
"End-to-End Pipeline Latency" table: per-stage latency and share of the total,
tokens/s, and the share of wall time spent outside the engine.

    python -m benchmarks.infer_latency [--prompts slp_runner/examples/prompts.jsonl] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import orjson

from benchmarks._report import out_dir, publish
from slp_runner.artifacts import MODEL, PROMPTS
from slp_runner.backends import seaweedfs_backend
from slp_runner.examples import gemma_path
from slp_runner.pipeline.run import cache_label
from slp_runner.seaweed_server import SeaweedServer, free_ports
from slp_runner.store import ArtifactStore

SLP = os.path.join(os.path.dirname(sys.executable), "slp")
ENGINE_STAGES = ("load_model", "inference")


def one_run(args: list[str], env: dict, runs: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([SLP, *args, f"runner.runs_dir={runs}"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    newest = sorted(d for d in os.listdir(runs) if d.startswith("run-"))[-1]
    with open(os.path.join(runs, newest, "manifest.json"), "rb") as f:
        return wall, orjson.loads(f.read())


def table(title: str, wall: float, m: dict) -> list[str]:
    total = m["total_latency_ms"]
    lines = [f"**{title}** (run {m['run_id']})", "", "| Stage | Latency | % Total | cache |", "|---|---|---|---|"]
    for name, st in m["stages"].items():
        lines.append(f"| {name} | {st['latency_ms'] / 1000:.3f} s | {100 * st['latency_ms'] / total:.1f}% "
                     f"| {cache_label(st)} |")
    lines.append(f"| Total (run) | {total / 1000:.3f} s | 100% | |")
    inf = m["stages"]["inference"]["metrics"]
    engine_ms = sum(m["stages"][s]["latency_ms"] for s in ENGINE_STAGES)
    lines += ["", f"- `slp` wall time {wall:.3f} s; in the engine (load + inference) {engine_ms / 1000:.3f} s; "
              f"outside the engine {wall - engine_ms / 1000:.3f} s = {100 * (1 - engine_ms / 1000 / wall):.1f}% of wall "
              f"(of the run itself: {100 * (1 - engine_ms / total):.1f}%)",
              f"- {inf['prompts_processed']} prompts, {inf['tokens_generated']} tokens, {inf['tokens_per_sec']} tokens/s, "
              f"latency p50 {inf['latency_ms']['p50']:.0f} ms p95 {inf['latency_ms']['p95']:.0f} ms, "
              f"TTFT p50 {inf['ttft_ms']['p50']:.0f} ms; model load {m['stages']['load_model']['metrics']['model_load_ms']:.0f} ms", ""]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default="slp_runner/examples/prompts.jsonl")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="slp-bench-infer-")
    server = SeaweedServer(os.path.join(work, "seaweed"), free_ports()).start()
    try:
        store = ArtifactStore(seaweedfs_backend(server.filer_url, root="bench"))
        model = store.put(gemma_path(), MODEL).oid
        prompts = store.put(args.prompts, PROMPTS).oid
        env = dict(os.environ, SLP_CACHE_DIR=os.path.join(work, "cache"))
        common = ["pipeline=run_infer", f"model.hash={model}", f"prompts.hash={prompts}", "backend=seaweedfs",
                  f"backend.filer_url={server.filer_url}", "backend.root=bench", f"engine.threads={args.threads}",
                  f"infer.max_tokens={args.max_tokens}"]
        runs = os.path.join(work, "runs")
        cold = one_run(common, env, runs)            # empty local cache: the model comes from the filer
        warm = one_run(common, env, runs)            # stage cache and local cache warm
        lines = [f"# run_infer latency: Gemma 3 270M Q4_K_M on SeaweedFS, {args.threads} CPU threads, "
                 f"max_tokens {args.max_tokens}", ""]
        lines += table("Cold cache", *cold) + table("Warm cache", *warm)
    finally:
        server.stop(timeout=5)
    publish(out_dir("infer"), lines)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
