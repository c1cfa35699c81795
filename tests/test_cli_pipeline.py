"""Pipelines through the `slp` command: SeaweedFS end to end, failure, Ctrl-C."""

import os
import signal
import subprocess
import time

import orjson

from test_cli import SLP, slp
from conftest import EXAMPLE_PROMPTS, TEST_CONF
from seaweed_cluster import default_signals

import pytest


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    return e


def run_ids(runs):
    return sorted(d for d in os.listdir(runs) if d.startswith("run-")) if os.path.isdir(runs) else []


def test_pipeline_end_to_end_on_seaweedfs(env, tmp_path, seaweed):
    backend = ["backend=seaweedfs", f"backend.filer_url={seaweed.filer_url}", "backend.root=e2e"]
    args = ["pipeline=put_get_model", f"runner.runs_dir={tmp_path / 'runs'}", *backend]
    first = slp(env, *args)
    assert first.returncode == 0, first.stderr
    assert "put_model" in first.stdout and "completed" in first.stdout
    second = slp(env, *args)
    assert second.returncode == 0, second.stderr
    (r1, r2) = run_ids(tmp_path / "runs")
    m2 = orjson.loads((tmp_path / "runs" / r2 / "manifest.json").read_bytes())
    assert all(s["cache_hit"] for s in m2["stages"].values())
    assert m2["artifacts"]["get_model.model"]["size_bytes"] > 200_000_000
    # the run folder is in the filer too, readable from anywhere
    import fsspec

    fs = fsspec.filesystem("seaweedfs", filer_url=seaweed.filer_url, skip_instance_cache=True)
    assert orjson.loads(fs.cat_file(f"e2e/runs/{r1}/manifest.json"))["status"] == "completed"
    listing = slp(env, "task=runs", f"runner.runs_dir={tmp_path / 'runs'}")
    assert r1 in listing.stdout and r2 in listing.stdout
    verify = slp(env, "task=verify_run", f"run={r1}", f"runner.runs_dir={tmp_path / 'nowhere'}", *backend)
    assert verify.returncode == 0, verify.stderr + verify.stdout
    assert "OK" in verify.stdout


def test_failed_run_exits_nonzero_with_one_line(env, tmp_path):
    proc = slp(env, f"hydra.searchpath=[file://{TEST_CONF}]", "pipeline=failing", f"prompts.path={EXAMPLE_PROMPTS}",
               f"runner.runs_dir={tmp_path / 'runs'}")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("slp: error: run run-") and len(proc.stderr.strip().splitlines()) == 1
    (rid,) = run_ids(tmp_path / "runs")
    assert orjson.loads((tmp_path / "runs" / rid / "manifest.json").read_bytes())["status"] == "failed"


def test_cycle_is_one_line_and_no_run(env, tmp_path):
    proc = slp(env, f"hydra.searchpath=[file://{TEST_CONF}]", "pipeline=cycle", f"runner.runs_dir={tmp_path / 'runs'}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "has a cycle" in proc.stderr
    assert run_ids(tmp_path / "runs") == []


def test_ctrl_c_marks_the_run_interrupted(env, tmp_path):
    proc = subprocess.Popen([SLP, f"hydra.searchpath=[file://{TEST_CONF}]", "pipeline=slow",
                             f"runner.runs_dir={tmp_path / 'runs'}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    deadline = time.time() + 30
    while time.time() < deadline and not os.path.isdir(tmp_path / "runs" / ".staging"):
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    (rid,) = run_ids(tmp_path / "runs")
    m = orjson.loads((tmp_path / "runs" / rid / "manifest.json").read_bytes())
    assert m["status"] == "interrupted"
    assert m["stages"]["wait"]["status"] == "interrupted"
    assert os.listdir(tmp_path / "runs" / ".staging") == []
