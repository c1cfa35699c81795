"""Listing runs with filters and pages (`task=runs`), and comparing two runs
(`task=compare`), on runs made by the real `slp` command on the local backend."""

import io
import os
import shutil
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from conftest import EXAMPLE_PROMPTS, TEST_CONF
from slp_runner.backends import local_backend
from slp_runner.errors import ArtifactNotFound, ConfigError
from slp_runner.pipeline import history
from slp_runner.pipeline.compare import compare, print_comparison
from slp_runner.pipeline.history import find_runs, list_runs, print_runs
from slp_runner.store import ArtifactStore
from test_cli import SLP

FIELD = "+pipeline.stages.transform.params.field=id"  # store_prompts upper-cases `id`: another results hash


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Three real runs shared by the tests that only read them: store_prompts, the same
    with one override, and the failing test pipeline. Uploaded to the local backend."""
    root = tmp_path_factory.mktemp("made")
    env = {**os.environ, "SLP_STORE_ROOT": str(root / "store"), "SLP_CACHE_DIR": str(root / "cache")}
    runs = str(root / "runs")

    def slp(*args):
        before = set(_ids(runs))
        proc = subprocess.run([SLP, *args, f"runner.runs_dir={runs}"], env=env, capture_output=True, text=True,
                              timeout=120)
        (new,) = set(_ids(runs)) - before
        return proc, new

    first, a = slp("pipeline=store_prompts")
    assert first.returncode == 0, first.stderr
    second, b = slp("pipeline=store_prompts", FIELD)
    assert second.returncode == 0, second.stderr
    failed, f = slp(f"hydra.searchpath=[file://{TEST_CONF}]", "pipeline=failing", f"prompts.path={EXAMPLE_PROMPTS}")
    assert failed.returncode == 1, failed.stdout
    return {"runs": runs, "store": str(root / "store"), "a": a, "b": b, "failed": f}


def _ids(runs):
    return sorted(d for d in os.listdir(runs) if d.startswith("run-")) if os.path.isdir(runs) else []


def _writable(folder):
    for d, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(d, name), os.stat(os.path.join(d, name)).st_mode | stat.S_IWUSR)


def _copy_runs(made, tmp_path):
    """The shared runs, for a test that changes them."""
    runs = str(tmp_path / "runs")
    shutil.copytree(made["runs"], runs)
    return runs


def ids(result):
    return [r["run_id"] for r in result["runs"]]


# -- filters -------------------------------------------------------------------


def test_filter_by_pipeline(made):
    assert sorted(ids(find_runs(made["runs"], pipeline="store_prompts"))) == sorted([made["a"], made["b"]])
    assert ids(find_runs(made["runs"], pipeline="failing")) == [made["failed"]]
    assert len(find_runs(made["runs"], pipeline="failing,store_prompts")["runs"]) == 3
    none = find_runs(made["runs"], pipeline="chain")
    assert (none["runs"], none["total"], none["pages"]) == ([], 0, 0)
    out = io.StringIO()
    print_runs(none, out)
    assert out.getvalue() == f"no runs match pipeline=chain in {os.path.abspath(made['runs'])}\n"


def test_filter_by_status(made):
    failed = find_runs(made["runs"], status="failed")
    assert ids(failed) == [made["failed"]] and failed["runs"][0]["pipeline"] == "failing"
    assert sorted(ids(find_runs(made["runs"], status="completed"))) == sorted([made["a"], made["b"]])
    assert len(find_runs(made["runs"], status="completed, failed")["runs"]) == 3
    assert find_runs(made["runs"], status="interrupted")["total"] == 0


def test_abandoned_staging_run_is_listed_first_and_filterable(made, tmp_path):
    runs = _copy_runs(made, tmp_path)
    # A real staging folder whose process died before finishing (as after a SIGKILL).
    code = ("import os, sys; from slp_runner.pipeline.run_folder import RunFolder, new_run_id\n"
            "f = RunFolder(sys.argv[1], new_run_id(b'x')); f.write_bytes('logs/a.log', b'')\n"
            "print(f.run_id, flush=True); os._exit(0)")
    dead = subprocess.run([sys.executable, "-c", code, runs], capture_output=True, text=True, check=True).stdout.strip()
    everything = find_runs(runs)
    assert ids(everything)[0] == dead and everything["total"] == 4 and everything["abandoned"] == 1
    (row,) = find_runs(runs, status="abandoned")["runs"]
    assert (row["run_id"], row["staging"], row["stages"]) == (dead, True, 1)
    assert ids(find_runs(runs, status="abandoned,failed")) == [dead, made["failed"]]
    out = io.StringIO()
    print_runs(find_runs(runs, status="failed"), out)
    assert "op=finalize" in out.getvalue()  # the hint shows whatever the filter


def test_since_and_until_on_real_runs(made):
    today = datetime.now(timezone.utc).date()
    assert find_runs(made["runs"], since="10m")["total"] == 3
    assert find_runs(made["runs"], since=600)["total"] == 3  # seconds, as Hydra passes a bare number
    assert find_runs(made["runs"], until="10m")["total"] == 0
    assert find_runs(made["runs"], since=today.isoformat())["total"] == 3
    assert find_runs(made["runs"], until=today.isoformat())["total"] == 3  # a date alone: the whole day
    assert find_runs(made["runs"], until=(today - timedelta(days=1)).isoformat())["total"] == 0
    assert find_runs(made["runs"], since=f"{today + timedelta(days=1)}T00:00")["total"] == 0
    out = io.StringIO()
    print_runs(find_runs(made["runs"], since="1d", status="interrupted"), out)
    assert out.getvalue().startswith("no runs match status=interrupted since=1d in ")


@pytest.mark.parametrize("kw, message", [
    ({"status": "done"}, r"^status='done': expected one or more of completed, failed"),
    ({"pipeline": " , "}, r"^pipeline=' , ': expected a name"),
    ({"since": "last week"}, r"^since='last week': expected an ISO date or time .* or a duration ago"),
    ({"until": "-2h"}, r"^until='-2h': expected"),
    ({"since": "1h", "until": "2h"}, r"^since='1h' is after until='2h'"),
    ({"page": 0}, r"^page=0: expected a whole number, 1 or more"),
    ({"limit": "ten"}, r"^limit='ten': expected a whole number"),
])
def test_bad_values_are_one_line_config_errors(made, kw, message):
    with pytest.raises(ConfigError, match=message) as err:
        find_runs(made["runs"], **kw)
    assert "\n" not in str(err.value)


# -- paging --------------------------------------------------------------------


@pytest.fixture
def many(made, tmp_path):
    """25 runs an hour or more apart: copies of one real run folder under new valid ids
    (timestamps 3 h, 9 h, 15 h, ... ago) with run_id and start_time adjusted to match.
    Copies, because making 25 runs for real would only slow the test down."""
    runs = tmp_path / "many"
    runs.mkdir()
    now = datetime.now(timezone.utc)
    for i in range(25):
        t = now - timedelta(hours=3 + 6 * i)
        rid = f"run-{t:%Y%m%d-%H%M%S}-{i:08x}"
        shutil.copytree(os.path.join(made["runs"], made["b"]), runs / rid)
        _writable(runs / rid)
        m = orjson.loads((runs / rid / "manifest.json").read_bytes())
        m.update(run_id=rid, start_time=t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        (runs / rid / "manifest.json").write_bytes(orjson.dumps(m))
    return str(runs)


def test_paging_beyond_20(many):
    first = find_runs(many)
    assert (len(first["runs"]), first["total"], first["pages"], first["page"], first["limit"]) == (20, 25, 2, 1, 20)
    second = find_runs(many, page=2)
    assert (len(second["runs"]), second["total"], second["pages"]) == (5, 25, 2)
    everything = ids(first) + ids(second)
    assert everything == sorted(_ids(many), reverse=True)  # newest first, nothing twice, nothing missed
    past = find_runs(many, page=3)
    assert (past["runs"], past["total"], past["pages"]) == ([], 25, 2)
    assert find_runs(many, limit=10)["pages"] == 3 and ids(find_runs(many, limit=10, page=3)) == everything[20:]
    out = io.StringIO()
    print_runs(first, out)
    assert out.getvalue().splitlines()[-1] == "page 1 of 2 (25 runs): page=2 for more"
    out = io.StringIO()
    print_runs(second, out)
    assert out.getvalue().splitlines()[-1] == "page 2 of 2 (25 runs)"
    assert len(list_runs(many, out=io.StringIO())) == 20  # the old entry point: the first page


def test_paging_reads_only_the_manifests_shown(many, monkeypatch):
    reads = []
    real = history._read_manifest
    monkeypatch.setattr(history, "_read_manifest", lambda folder: reads.append(folder) or real(folder))
    assert len(find_runs(many, limit=5, page=2)["runs"]) == 5
    assert len(reads) == 5
    reads.clear()
    assert find_runs(many, status="completed", limit=5)["total"] == 25
    assert len(reads) == 25  # a status filter has to look at every run


def test_since_and_until_over_days(many):
    def day(rid):
        return datetime.strptime(rid[4:12], "%Y%m%d").date()

    assert len(find_runs(many, since="1d")["runs"]) == 4  # 3 h, 9 h, 15 h and 21 h ago
    assert find_runs(many, since="2d", until="1d")["total"] == 4  # 27 h .. 45 h ago
    middle = day(_ids(many)[12])
    since = find_runs(many, since=middle.isoformat(), limit=100)
    assert ids(since) == sorted((r for r in _ids(many) if day(r) >= middle), reverse=True)
    until = find_runs(many, until=middle.isoformat(), limit=100)
    assert ids(until) == sorted((r for r in _ids(many) if day(r) <= middle), reverse=True)


# -- overrides -----------------------------------------------------------------


def test_overrides_in_rows_and_printed(made):
    result = find_runs(made["runs"], pipeline="store_prompts")
    rows = {r["run_id"]: r for r in result["runs"]}
    assert FIELD in rows[made["b"]]["overrides"] and "pipeline=store_prompts" in rows[made["b"]]["overrides"]
    assert FIELD not in rows[made["a"]]["overrides"]
    assert rows[made["b"]]["folder"] == os.path.join(os.path.abspath(made["runs"]), made["b"])
    out = io.StringIO()
    print_runs(result, out)
    lines = out.getvalue().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith(made["b"]))
    assert "completed" in lines[at] and "store_prompts" in lines[at]
    assert lines[at + 1].startswith("    ") and FIELD in lines[at + 1]


# -- compare -------------------------------------------------------------------


def test_compare_two_runs_differing_by_one_override(made):
    result = compare(made["a"], made["b"], made["runs"])
    assert (result["a"], result["b"]) == (made["a"], made["b"])
    assert result["status"] == {"a": "completed", "b": "completed"}
    assert FIELD in result["overrides"]["b"] and FIELD not in result["overrides"]["a"]
    assert result["config"] == [{"key": "pipeline.stages.transform.params.field", "a": None, "b": "id"}]
    metrics = {(m["stage"], m["metric"]): m for m in result["metrics"]}
    records = metrics[("transform", "records")]
    assert (records["a"], records["b"], records["ratio"]) == (4, 4, 1.0)
    for stage in ("(run)", "put_prompts", "fetch_prompts", "transform", "store_results"):
        timing = metrics[(stage, "total_latency_ms" if stage == "(run)" else "latency_ms")]
        assert timing["a"] > 0 and timing["b"] > 0 and timing["ratio"] == pytest.approx(timing["b"] / timing["a"])
    same = {x["name"]: x["same"] for x in result["artifacts"]}
    assert same == {"put_prompts.prompts": True, "fetch_prompts.prompts": True, "store_results.results": False}
    out = io.StringIO()
    print_comparison(result, out)
    text = out.getvalue()
    assert f"A: {made['a']}  completed  store_prompts" in text and f"B: {made['b']}  completed" in text
    assert "config differences (1):" in text and "pipeline.stages.transform.params.field" in text
    assert "B/A" in text and "artifacts (2 same, 1 different):" in text
    (diff,) = [ln for ln in text.splitlines() if ln.strip().startswith("DIFFERENT")]
    results = next(x for x in result["artifacts"] if x["name"] == "store_results.results")
    assert diff.split()[1:] == ["store_results.results", "results", results["a"][:12], results["b"][:12]]


def test_compare_a_run_with_itself_and_with_a_failed_run(made):
    same = compare(made["a"], made["a"], made["runs"])
    assert same["config"] == [] and all(x["same"] for x in same["artifacts"])
    assert all(m["ratio"] in (1.0, None) for m in same["metrics"])
    out = io.StringIO()
    print_comparison(same, out)
    assert "config: identical" in out.getvalue()
    failed = compare(made["a"], made["failed"], made["runs"])
    assert failed["status"] == {"a": "completed", "b": "failed"}
    assert {"key": "pipeline.name", "a": "store_prompts", "b": "failing"} in failed["config"]
    stages = {m["stage"] for m in failed["metrics"]}
    assert {"store_results", "boom", "independent"} <= stages  # stages of either run
    print_comparison(failed, io.StringIO())


def test_compare_reads_a_run_from_the_backend(made, tmp_path):
    runs = _copy_runs(made, tmp_path)
    gone = os.path.join(runs, made["b"])
    _writable(gone)  # run folders are read-only
    shutil.rmtree(gone)
    store = ArtifactStore(local_backend(made["store"]))
    remote = compare(made["a"], made["b"], runs, store=store)
    local = compare(made["a"], made["b"], made["runs"])
    for part in ("status", "overrides", "config", "artifacts"):
        assert remote[part] == local[part]
    with pytest.raises(ArtifactNotFound, match=f"no run {made['b']} in "):
        compare(made["a"], made["b"], runs)  # no store: nowhere to look
    with pytest.raises(ConfigError, match="invalid run id 'run-latest'"):
        compare("run-latest", made["a"], runs, store=store)
