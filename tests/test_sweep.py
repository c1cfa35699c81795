"""Multirun sweeps of the storage benchmark: a small real sweep on local and SeaweedFS
ends in a summary with the right rows; an interrupted sweep resumes without redoing
finished jobs; a failed job's row keeps its parameters and error; each job's console
line names its overrides, secrets masked."""

import csv
import os
import subprocess

import orjson
import pytest

from slp_runner.bench.sweep import sweep_defaults, write_job_result, write_summary
from slp_runner.redaction import REDACTED
from test_cli import SLP


def sweep(env, tmp_path, sweep_dir, *extra):
    return subprocess.run(
        [SLP, "-m", "pipeline=bench_storage", "backend=local,seaweedfs", "bench.size_mb=1,2",
         "bench.op=upload,download", "bench.iterations=2", "bench.min_seconds=0", "bench.warmup=0",
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


SECRET = "hunter2-xyz"
JOBS = [("local", "upload"), ("local", "bogus"), ("seaweedfs", "upload"), ("seaweedfs", "bogus")]  # Hydra's order


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory, seaweed):
    """A real sweep of 4 jobs where the 2 with op=bogus fail; a secret on the command line."""
    tmp = tmp_path_factory.mktemp("failing-sweep")
    env = dict(os.environ, SLP_STORE_ROOT=str(tmp / "store"), SLP_CACHE_DIR=str(tmp / "cache"),
               SLP_FILER_URL=seaweed.filer_url, SLP_FILER_ROOT="failing-sweep")
    proc = subprocess.run(
        [SLP, "-m", "pipeline=bench_storage", "backend=local,seaweedfs", "++bench.op=upload,bogus",
         "bench.size_mb=1", "bench.iterations=1", "bench.min_seconds=0", "bench.warmup=0", f"++provenance.token={SECRET}",
         f"hydra.sweep.dir={tmp / 'sweep'}", f"runner.runs_dir={tmp / 'runs'}"],
        env=env, capture_output=True, text=True, timeout=300)
    return proc, tmp / "sweep"


def test_failed_job_row_keeps_its_parameters_and_error(failing_sweep):
    proc, sweep_dir = failing_sweep
    assert proc.returncode == 1 and "slp: error: 2 of 4 sweep jobs failed" in proc.stderr, proc.stderr[-2000:]
    assert "slp: error" not in proc.stdout  # errors go to stderr, the summary to stdout
    with open(sweep_dir / "summary.csv") as f:
        rows = {r["job"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["0", "1", "2", "3"]
    for job, (backend, op) in enumerate(JOBS):
        r = rows[str(job)]
        assert (r["backend"], r["op"], r["size_mb"]) == (backend, op, "1"), r
        assert f"backend={backend} ++bench.op={op} bench.size_mb=1" in r["overrides"]
        if op == "bogus":
            assert r["status"] == "failed" and "unknown benchmark op 'bogus'" in r["error"], r
        else:
            assert r["status"] == "completed" and not r["error"] and float(r["slp_mib_s"]) > 0
    md = (sweep_dir / "summary.md").read_text()
    for backend in ("local", "seaweedfs"):
        (line,) = [ln for ln in md.splitlines() if ln.startswith(f"| {backend} | bogus | 1 |")]
        assert "| failed |" in line and "unknown benchmark op 'bogus'" in line
    assert SECRET not in md and SECRET not in (sweep_dir / "summary.csv").read_text()


def test_each_job_console_line_names_its_overrides_secrets_masked(failing_sweep):
    proc, _ = failing_sweep
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[job ")]
    assert len(lines) == 4, proc.stdout[-3000:]
    for job, (line, (backend, op)) in enumerate(zip(lines, JOBS)):
        assert line.startswith(f"[job {job}] pipeline=bench_storage backend={backend} ++bench.op={op} "
                               "bench.size_mb=1 "), line
        assert f"++provenance.token={REDACTED}" in line
    assert SECRET not in proc.stdout + proc.stderr


def test_failed_job_without_its_parameters_takes_the_sweeps(tmp_path):
    """Jobs that failed before their pipeline ran (the task's own error): the parameters
    they did not override are the sweep config's, as Hydra composed it."""
    from hydra import compose, initialize_config_dir

    from slp_runner.app import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["pipeline=bench_storage", "backend=seaweedfs", "bench.size_mb=64"],
                      return_hydra_config=True)
        other = compose("config", overrides=["pipeline=store_prompts"], return_hydra_config=True)
    defaults = sweep_defaults(cfg)
    assert defaults == {"backend": "seaweedfs", "bench.op": "upload", "bench.size_mb": 64}
    assert sweep_defaults(other) == {"backend": "local"}  # its jobs never ran a bench op or size
    for job, workers in enumerate(("x", "y")):
        error = f"ConfigError: runner.workers must be a whole number, got {workers!r}"
        overrides = [f"runner.workers={workers}", "+bench.op=hash"][:2 - job]  # job 1 leaves op to the sweep
        write_job_result(str(tmp_path / str(job)), {"status": "failed", "error": error, "overrides": overrides})
    write_summary(str(tmp_path), defaults)
    with open(tmp_path / "summary.csv") as f:
        rows = [(r["backend"], r["op"], r["size_mb"], r["status"], r["overrides"], r["error"][-3:])
                for r in csv.DictReader(f)]
    assert rows == [("seaweedfs", "hash", "64", "failed", "runner.workers=x +bench.op=hash", "'x'"),
                    ("seaweedfs", "upload", "64", "failed", "runner.workers=y", "'y'")]
    md = (tmp_path / "summary.md").read_text()
    assert "| seaweedfs | hash | 64 |" in md and "| runner.workers=x | ConfigError: runner.workers" in md
    assert "| seaweedfs | upload | 64 |" in md and "| runner.workers=y | ConfigError: runner.workers" in md
