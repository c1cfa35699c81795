"""The whole-process benchmarks (bench.op=cli_*): a real sweep of every op on local and
on the test SeaweedFS ends in summary rows with both series, the reference named and
the slp process's peak RSS; on S3 the slp processes find the store only through the
environment and overrides the job derives from its own store; the README table is
rebuilt from the summaries between its markers and nowhere else. Nothing is timed
against a threshold: the figures only have to exist and be positive."""

import csv
import os
import subprocess
import sys
import uuid

import orjson
import pytest

from conftest import make_backend
from slp_runner import backends
from slp_runner.bench import readme_table
from slp_runner.bench.cli_ops import backend_settings, passed_overrides
from slp_runner.bench.storage import run_storage_bench
from slp_runner.store import ArtifactStore

SLP = os.path.join(os.path.dirname(sys.executable), "slp")
OPS = ("cli_get", "cli_put", "cli_hit", "cli_ls")
REFERENCES = {("local", "cli_get"): "cp (process)", ("local", "cli_put"): "cp (process)",
              ("seaweedfs", "cli_get"): "curl -o (process)", ("seaweedfs", "cli_put"): "curl -T (process)"}
HYDRA = 'python -c "import hydra"'


@pytest.fixture(scope="module")
def cli_sweep(tmp_path_factory, seaweed):
    """One real sweep: local and SeaweedFS x the four cli ops, 1 MiB, 1 iteration."""
    tmp = tmp_path_factory.mktemp("cli-sweep")
    env = dict(os.environ, SLP_STORE_ROOT=str(tmp / "store"), SLP_CACHE_DIR=str(tmp / "cache"),
               SLP_FILER_URL=seaweed.filer_url, SLP_FILER_ROOT=f"cli-sweep-{uuid.uuid4().hex[:8]}")
    proc = subprocess.run(
        [SLP, "-m", "pipeline=bench_storage", "backend=local,seaweedfs", f"bench.op={','.join(OPS)}",
         "bench.size_mb=1", "bench.iterations=1", "bench.warmup=0", f"hydra.sweep.dir={tmp / 'bench' / 'cli'}",
         f"runner.runs_dir={tmp / 'runs'}"],
        env=env, capture_output=True, text=True, timeout=600)
    return proc, tmp


def test_every_cli_op_has_both_series_and_the_reference_named(cli_sweep):
    proc, tmp = cli_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp / "bench" / "cli" / "summary.csv") as f:
        rows = {(r["backend"], r["op"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted((b, o) for b in ("local", "seaweedfs") for o in OPS)
    for (backend, op), r in rows.items():
        assert r["status"] == "completed" and r["success_rate"] == "1.0", r
        assert float(r["slp_p50_ms"]) > 0 and float(r["reference_p50_ms"]) > 0, r
        assert float(r["ratio"]) > 0 and float(r["peak_rss_mib"]) > 0, r  # the slp process's own RSS
        assert r["reference"] == REFERENCES.get((backend, op), HYDRA), r
        if op in ("cli_hit", "cli_ls"):
            assert r["floor"] == "python -c pass" and float(r["floor_p50_ms"]) > 0, r
        else:
            assert r["floor"] == "", r
    md = (tmp / "bench" / "cli" / "summary.md").read_text()
    assert "floor_p50_ms" in md and md.count("| cli_") == 8
    blobs = tmp / "store" / "blobs"  # every object the benchmark put is gone again
    assert not blobs.exists() or os.listdir(blobs) == []


def test_each_job_records_the_command_a_user_types(cli_sweep):
    _, tmp = cli_sweep
    commands = {}
    for job in sorted(os.listdir(tmp / "bench" / "cli")):
        if job.isdigit():
            metrics = orjson.loads((tmp / "bench" / "cli" / job / "result.json").read_bytes())["stages"]["bench"][
                "metrics"]
            commands[(metrics["backend"], metrics["op"])] = (metrics["command"], metrics["environment"])
    assert commands[("local", "cli_get")] == ("slp task=get hash=<...> backend=local", ["SLP_STORE_ROOT"])
    assert commands[("seaweedfs", "cli_put")] == ("slp task=put kind=blob path=<...> backend=seaweedfs",
                                                  ["SLP_FILER_ROOT", "SLP_FILER_URL"])
    assert commands[("seaweedfs", "cli_ls")][0] == "slp task=ls backend=seaweedfs"


def test_s3_processes_find_the_store_through_the_environment_alone(tmp_path, seaweed, monkeypatch):
    """No SLP_S3_* in this process's environment and a prefix no variable names: a get
    and a put succeed only if the job's own store reached the slp processes."""
    for var in ("SLP_S3_ENDPOINT", "SLP_S3_BUCKET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    backend = make_backend("s3", seaweed, tmp_path)
    env, extra = backend_settings(backend, [])
    assert env == {"SLP_S3_BUCKET": "slp-test", "SLP_S3_ENDPOINT": seaweed.s3_url,
                   "AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key}
    prefix = backend.root.partition("/")[2]
    assert extra == ["backend=s3", f"backend.root={prefix}"]
    store = ArtifactStore(backend)
    for op, tool in (("cli_get", "boto3 download_file (python -c process)"),
                     ("cli_put", "boto3 upload_file (python -c process)")):
        m = run_storage_bench(store, op=op, size_mb=0.25, iterations=1, warmup=0, workdir=str(tmp_path))
        assert m["slp"]["success_rate"] == 1.0, m["slp"].get("first_error")
        assert m["reference"]["tool"] == tool and m["reference"]["success_rate"] == 1.0, m["reference"]
        assert m["slp"]["latency_ms"]["p50"] > 0 and m["reference"]["latency_ms"]["p50"] > 0
        assert m["peak_rss_mib"] > 0 and m["command"].endswith(f"backend=s3 backend.root={prefix}")
    left = [p for p in store.fs.find(backend.path("blobs")) if p.endswith((".bin", ".json"))]
    assert left == []  # each put's object and manifest removed again


def test_a_failing_slp_process_fails_the_job_with_its_stderr(tmp_path):
    backend = make_backend("local", None, tmp_path)
    failed = r"every slp process failed.*slp exited \d+: slp: error: unknown backend .nosuch."
    with pytest.raises(RuntimeError, match=failed):
        run_storage_bench(ArtifactStore(backend), op="cli_ls", size_mb=0.01, iterations=1, warmup=0,
                          workdir=str(tmp_path), overrides=["backend=nosuch"])


def test_passed_overrides_are_the_backend_and_what_changes_a_get_or_put():
    given = ["pipeline=bench_storage", "backend=s3", "backend.part_size_mb=16", "+backend.x=1", "bench.op=cli_get",
             "verify_upload=rehash", "hydra.sweep.dir=/tmp/x", "runner.runs_dir=/tmp/r", "cache_dir=/tmp/c"]
    assert passed_overrides(given) == ["backend=s3", "backend.part_size_mb=16", "+backend.x=1",
                                       "verify_upload=rehash"]
    env, extra = backend_settings(backends.local_backend(root="/tmp/somewhere"), ["backend=local"])
    assert env == {"SLP_STORE_ROOT": "/tmp/somewhere"} and extra == []  # backend= typed: not again


README = """# Title

Text before, with a table of its own:

| a | b |
|---|---|
| 1 | 2 |

<!-- perf-table:start -->
stale figures
<!-- perf-table:end -->

## After

Text after.
"""


def test_readme_table_rewrites_only_between_the_markers(cli_sweep, tmp_path):
    _, tmp = cli_sweep
    readme = tmp_path / "README.md"
    readme.write_text(README)
    run = subprocess.run([sys.executable, "-m", "slp_runner.bench.readme_table", str(tmp / "bench"),
                          "--readme", str(readme)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = readme.read_text()
    head, _, rest = text.partition(readme_table.START)
    inside, _, tail = rest.partition(readme_table.END)
    assert head == README.partition(readme_table.START)[0]
    assert tail == README.partition(readme_table.END)[2]
    assert "stale figures" not in inside
    lines = inside.strip().splitlines()
    assert lines[0].startswith("| what | in-process: slp | reference | ratio | whole process: slp |")
    rows = {ln.split(" | ")[0].lstrip("| "): ln.split(" | ") for ln in lines[2:] if ln.startswith("| ")}
    assert set(rows) == {f"{b}: {w}" for b in ("local", "seaweedfs")
                         for w in ("put, 1 MiB", "get, empty cache, 1 MiB", "get, cache hit, 1 MiB", "ls")}
    assert "curl -o (process): " in rows["seaweedfs: get, empty cache, 1 MiB"][5]
    assert rows["local: ls"][5].startswith(f"{HYDRA}: ")
    assert all(r[4] != "-" and r[6] != "-" for r in rows.values())  # the whole-process side is filled
    assert f"run folder `{tmp / 'bench'}`" in inside and " cores, " in inside and ", Python 3." in inside
    assert "takes" in inside and "target: at most 1.6x" in inside
    # run again: the same file (only the markers' content is ever written)
    again = subprocess.run([sys.executable, "-m", "slp_runner.bench.readme_table", str(tmp / "bench"),
                            "--readme", str(readme)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and readme.read_text() == text


def test_readme_without_markers_is_left_alone(cli_sweep, tmp_path):
    _, tmp = cli_sweep
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    run = subprocess.run([sys.executable, "-m", "slp_runner.bench.readme_table", str(tmp / "bench"),
                          "--readme", str(readme)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "perf-table:start" in run.stderr
    assert readme.read_text() == "# no markers here\n"


def test_in_process_ops_run_until_min_seconds_within_max_iterations(tmp_path):
    store = ArtifactStore(make_backend("local", None, tmp_path))
    exact = run_storage_bench(store, op="upload", size_mb=1, iterations=2, warmup=0, workdir=str(tmp_path))
    assert exact["iterations"] == 2 == len(exact["slp"]["iterations_ms"]) == len(exact["reference"]["iterations_ms"])
    longer = run_storage_bench(store, op="upload", size_mb=1, iterations=1, warmup=0, workdir=str(tmp_path),
                               min_seconds=0.05, max_iterations=400)
    ran = longer["slp"]["iterations_ms"]
    assert longer["iterations"] == len(ran) and len(longer["reference"]["iterations_ms"]) == len(ran)
    # stopped at the first whole round of turns (slp first, then the reference first)
    # that reached 50 ms in all (the times are rounded to 1 us)
    assert len(ran) % 2 == 0
    assert sum(ran) >= 50 - 0.01 * len(ran) and sum(ran[:-2]) < 50 + 0.01 * len(ran)
    odd = run_storage_bench(store, op="upload", size_mb=1, iterations=3, warmup=1, workdir=str(tmp_path))
    assert odd["iterations"] == 4 == len(odd["reference"]["iterations_ms"])  # each went first twice
    capped = run_storage_bench(store, op="upload", size_mb=1, iterations=2, warmup=0, workdir=str(tmp_path),
                               min_seconds=60, max_iterations=4)
    assert capped["iterations"] == 4


def test_each_tool_takes_every_place_in_turn():
    # Whoever runs after another pays for what it left the server doing (a filer deleting
    # a 1 GiB file's chunks): over len(steps) iterations each step is first, second, ... once.
    from slp_runner.bench.storage import in_turn

    for steps in (["slp", "curl"], ["slp", "slp alone", "curl"]):
        orders = [in_turn(steps, i) for i in range(len(steps))]
        assert all(sorted(order) == sorted(steps) for order in orders)
        for place in range(len(steps)):
            assert sorted(order[place] for order in orders) == sorted(steps)
    assert in_turn([], 3) == []
