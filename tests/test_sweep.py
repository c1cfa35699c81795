"""Multirun sweeps of the storage benchmark: a small real sweep on local and SeaweedFS
ends in a summary with the right rows; an interrupted sweep resumes without redoing
finished jobs."""

import csv
import os
import subprocess

import orjson

from test_cli import SLP


def sweep(env, tmp_path, sweep_dir, *extra):
    return subprocess.run(
        [SLP, "-m", "pipeline=bench_storage", "backend=local,seaweedfs", "bench.size_mb=1,2",
         "bench.op=upload,download", "bench.iterations=2", "bench.warmup=0",
         f"hydra.sweep.dir={sweep_dir}", f"runner.runs_dir={tmp_path / 'runs'}", *extra],
        env=env, capture_output=True, text=True, timeout=600)


def test_sweep_summary_and_resume(tmp_path, seaweed):
    env = dict(os.environ, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"),
               SLP_FILER_URL=seaweed.filer_url, SLP_FILER_ROOT="sweep-test")
    sweep_dir = tmp_path / "sweep"
    first = sweep(env, tmp_path, sweep_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    combos = sorted((r["backend"], r["op"], float(r["size_mb"])) for r in rows)
    assert combos == sorted((b, o, s) for b in ("local", "seaweedfs") for o in ("upload", "download") for s in (1, 2))
    assert all(r["status"] == "completed" and float(r["slp_mib_s"]) > 0 and float(r["ratio"]) > 0 for r in rows)
    refs = {r["backend"]: r["reference"] for r in rows}
    assert refs == {"local": "plain copy", "seaweedfs": "curl (single stream)"}
    md = (sweep_dir / "summary.md").read_text()
    assert md.count("\n| local |") + md.count("\n| seaweedfs |") == 8
    assert (sweep_dir / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs_before = set(os.listdir(tmp_path / "runs"))

    # interrupt: three jobs never finished
    lost = ["1", "4", "6"]
    for job in lost:
        os.unlink(sweep_dir / job / "result.json")
    (sweep_dir / "summary.csv").unlink()
    resumed = sweep(env, tmp_path, sweep_dir, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("already completed") == 8 - len(lost)
    new_runs = set(os.listdir(tmp_path / "runs")) - runs_before
    assert len([r for r in new_runs if r.startswith("run-")]) == len(lost)
    with open(sweep_dir / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 8
    for job in lost:
        assert orjson.loads((sweep_dir / job / "result.json").read_bytes())["status"] == "completed"
