"""The stage-graph runner, with pipelines composed from YAML through Hydra's compose API."""

import io
import os
import stat

import orjson
import pytest

from slp_runner.cache import LocalCache
from slp_runner.cli import build_store
from slp_runner.errors import PipelineError, RunFailed
from slp_runner.pipeline import from_config
from slp_runner.pipeline.history import list_runs, load_manifest, verify_run
from slp_runner.pipeline.run_folder import new_run_id



def run(cfg, **kw):
    store = build_store(cfg)
    return from_config.run_pipeline(cfg, store, LocalCache(cfg.cache_dir), list(kw.pop("overrides", [])),
                                    out=io.StringIO(), **kw)


def test_stages_run_in_dependency_order(make_cfg):
    result = run(make_cfg("pipeline=chain"))
    out = {n: r.outputs for n, r in result.records.items()}
    assert out["a"]["ended"] <= out["b"]["started"]
    assert out["b"]["ended"] <= out["c"]["started"]


def test_independent_stages_run_concurrently_within_the_worker_bound(make_cfg):
    both = run(make_cfg("pipeline=fan", "runner.workers=2")).records
    assert both["left"].outputs["started"] < both["right"].outputs["ended"]
    assert both["right"].outputs["started"] < both["left"].outputs["ended"]  # overlapping
    one = run(make_cfg("pipeline=fan", "runner.workers=1")).records
    first, second = sorted((one["left"].outputs, one["right"].outputs), key=lambda o: o["started"])
    assert first["ended"] <= second["started"]  # one worker: one at a time


@pytest.mark.parametrize("name, message", [
    ("cycle", r"pipeline 'cycle' has a cycle: (a -> b -> a|b -> a -> b)"),
    ("dangling", r"stage 'a' input 'x': no stage named 'ghost'"),
    ("unknown_target", r"stage 'a': unknown target 'slp_runner.stages.builtin.does_not_exist'"),
])
def test_bad_graphs_are_rejected_naming_the_stage(make_cfg, tmp_path, name, message):
    with pytest.raises(PipelineError, match=message):
        run(make_cfg(f"pipeline={name}"))
    assert not os.path.exists(tmp_path / "runs")  # rejected before any run folder exists


def test_stage_cache_hits_and_misses(make_cfg, tmp_path):
    first = run(make_cfg("pipeline=store_prompts"))
    assert not any(r.cache_hit for r in first.records.values())
    second = run(make_cfg("pipeline=store_prompts"))
    assert all(r.cache_hit for r in second.records.values())
    assert second.manifest["artifacts"] == first.manifest["artifacts"]
    # a changed parameter re-runs that stage and what depends on it
    changed = run(make_cfg("pipeline=store_prompts", "+pipeline.stages.transform.params.field=id"))
    hits = {n: r.cache_hit for n, r in changed.records.items()}
    assert hits == {"put_prompts": True, "fetch_prompts": True, "transform": False, "store_results": False}
    # a changed input file re-runs everything downstream of it
    edited = tmp_path / "p.jsonl"
    edited.write_text('{"prompt": "new"}\n')
    moved = run(make_cfg("pipeline=store_prompts", f"prompts.path={edited}"))
    assert not any(r.cache_hit for r in moved.records.values())
    # force ignores the cache
    forced = run(make_cfg("pipeline=store_prompts", "runner.force=true"))
    assert not any(r.cache_hit for r in forced.records.values())


def test_cache_hit_needs_outputs_to_still_exist(make_cfg):
    first = run(make_cfg("pipeline=store_prompts"))
    cached = first.records["fetch_prompts"].outputs["path"].path
    os.chmod(cached, 0o644)
    os.unlink(cached)
    again = run(make_cfg("pipeline=store_prompts"))
    assert again.records["put_prompts"].cache_hit
    assert not again.records["fetch_prompts"].cache_hit
    assert os.path.exists(cached)


def test_run_folder_contents_and_immutability(make_cfg, tmp_path):
    cfg = make_cfg("pipeline=store_prompts", "+backend.secret_token=hunter2")
    result = run(cfg, overrides=["pipeline=store_prompts"])
    folder = result.folder
    assert os.path.basename(folder) == result.run_id
    names = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    assert {"manifest.json", "config.yaml", "overrides.yaml", "metrics.json", "logs/put_prompts.log",
            "logs/store_results.log", "stages/transform/results.jsonl"} <= set(names)
    m = orjson.loads(open(os.path.join(folder, "manifest.json"), "rb").read())
    assert m["status"] == "completed" and m["run_id"] == result.run_id
    assert set(m["stages"]) == {"put_prompts", "fetch_prompts", "transform", "store_results"}
    assert all("latency_ms" in s and "cache_hit" in s for s in m["stages"].values())
    assert m["artifacts"]["store_results.results"]["kind"] == "results"
    assert {"hostname", "os", "cpu", "memory_bytes", "python", "packages"} <= set(m["system"])
    assert m["overrides"] == ["pipeline=store_prompts"]
    config = open(os.path.join(folder, "config.yaml")).read()
    assert "hunter2" not in config and "secret_token: '***'" in config
    for name in names:
        assert not os.stat(os.path.join(folder, name)).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert not os.listdir(tmp_path / "runs" / ".staging")
    # the same run again is a new folder; the first is untouched
    again = run(cfg)
    assert again.run_id != result.run_id
    assert orjson.loads(open(os.path.join(folder, "manifest.json"), "rb").read()) == m
    # published to the backend, manifest included
    store = build_store(cfg)
    assert load_manifest(result.run_id, str(tmp_path / "elsewhere"), store)["run_id"] == result.run_id


def test_run_ids_are_unique():
    ids = {new_run_id(b"same config") for _ in range(2000)}
    assert len(ids) == 2000


def test_failure_is_contained_and_reported(make_cfg, tmp_path):
    with pytest.raises(RunFailed, match="boom: this stage fails on purpose"):
        run(make_cfg("pipeline=failing"))
    (run_id,) = [d for d in os.listdir(tmp_path / "runs") if d.startswith("run-")]
    m = orjson.loads(open(tmp_path / "runs" / run_id / "manifest.json", "rb").read())
    assert m["status"] == "failed"
    st = {n: s["status"] for n, s in m["stages"].items()}
    assert st == {"put": "completed", "boom": "failed", "after_boom": "skipped", "independent": "completed"}
    assert "fails on purpose" in m["stages"]["boom"]["error"]
    assert "fails on purpose" in open(tmp_path / "runs" / run_id / "logs" / "boom.log").read()


def test_reproduce_gives_identical_hashes(make_cfg):
    cfg = make_cfg("pipeline=store_prompts")
    original = run(cfg)
    result, comparison = from_config.reproduce(make_cfg(), build_store(cfg), LocalCache(cfg.cache_dir),
                                               original.run_id, out=io.StringIO())
    assert comparison and all(comparison.values())
    assert result.manifest["reproduces"] == original.run_id
    assert not any(r.cache_hit for r in result.records.values())  # really re-run


def test_verify_run_catches_a_corrupted_artifact(make_cfg):
    cfg = make_cfg("pipeline=store_prompts")
    result = run(cfg)
    store, cache = build_store(cfg), LocalCache(cfg.cache_dir)
    assert verify_run(result.manifest, store, cache, out=io.StringIO()) == []
    art = result.manifest["artifacts"]["store_results.results"]
    path = store.backend.path("results", f"{art['hash']}.jsonl")
    store.fs.pipe_file(path, b'{"tampered": true}\n')
    problems = verify_run(result.manifest, store, cache, out=io.StringIO())
    assert [p["artifact"] for p in problems] == ["store_results.results"]


def test_list_runs(make_cfg, tmp_path):
    run(make_cfg("pipeline=store_prompts"))
    run(make_cfg("pipeline=store_prompts"))
    out = io.StringIO()
    rows = list_runs(str(tmp_path / "runs"), out=out)
    assert len(rows) == 2 and rows[0]["start_time"] > rows[1]["start_time"]
    assert rows[0]["cache_hits"] == 4 and "completed" in out.getvalue()


def test_user_stage_is_a_plain_function_without_hydra(tmp_path):
    """The core needs no Hydra: a dict graph, a store, a cache."""
    from slp_runner.backends import local_backend
    from slp_runner.pipeline.run import execute
    from slp_runner.pipeline.spec import build_pipeline
    from slp_runner.store import ArtifactStore

    pipeline = build_pipeline("words", {
        "count": {"_target_": "user_stages.count_words", "params": {"text": "one two three"}},
        "twice": {"_target_": "user_stages.double", "inputs": {"value": "@count.count"}},
    })
    result = execute(pipeline, ArtifactStore(local_backend(str(tmp_path / "store"))), LocalCache(str(tmp_path / "c")),
                     config_yaml="{}", overrides=[], runs_dir=str(tmp_path / "runs"), out=io.StringIO())
    assert result.records["twice"].outputs == {"value": 6}
    assert result.manifest["stages"]["count"]["metrics"] == {"words": 3}


def test_s3_credentials_never_reach_the_saved_config(make_cfg):
    cfg = make_cfg("backend=s3", "backend.key=AKIAEXAMPLEKEY", "backend.secret=top-secret-value")
    text = from_config.redacted_yaml(cfg)
    assert "AKIAEXAMPLEKEY" not in text and "top-secret-value" not in text
    assert "key: '***'" in text and "secret: '***'" in text
    assert "endpoint_url: http://127.0.0.1:8333" in text  # the rest stays, for reproduce
