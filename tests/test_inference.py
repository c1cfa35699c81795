"""Inference on a real llama-server with the real Gemma 3 270M: run_infer end to end,
determinism and reproduce, the model cache, failing prompts, external servers, and a
server that dies. Few tokens per prompt, to stay quick on 2 cores."""

import io
import glob
import os
import signal
import subprocess
import threading
import time

import orjson
import psutil
import pytest

from slp_runner.artifacts import MODEL, PROMPTS
from slp_runner.cache import LocalCache
from slp_runner.cli import build_store
from slp_runner.engine.client import CompletionClient
from slp_runner.engine.llama_server import ManagedLlamaServer
from slp_runner.errors import RunFailed
from slp_runner.pipeline import from_config
from test_cli import SLP
from test_pipeline import run

FAST = ["infer.max_tokens=8", "engine.ctx_size=512"]


def llama_servers():
    return [p for p in psutil.process_iter(["name", "cmdline"]) if "llama-server" in " ".join(p.info["cmdline"] or [])]


@pytest.fixture(autouse=True)
def no_server_left_behind(tmp_path_factory):
    # Only this session's servers (their model sits under its temporary folders): another
    # test run on the same machine may have its own llama-server up meanwhile.
    ours = str(tmp_path_factory.getbasetemp())
    before = {p.pid for p in llama_servers()}
    yield
    time.sleep(0.2)
    left = [p for p in llama_servers() if p.pid not in before and ours in " ".join(p.info["cmdline"] or [])]
    assert not left, f"llama-server left running: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def external_server(gemma_path, tmp_path_factory):
    """Somebody else's llama-server, for the external-engine pipelines."""
    log = tmp_path_factory.mktemp("ext") / "server.log"
    with ManagedLlamaServer(gemma_path, log_path=str(log), ctx_size=512, parallel=2) as server:
        yield server


@pytest.fixture
def stored(gemma_path, tmp_path, make_cfg):
    """The Gemma model and a prompt batch put into a fresh local store."""
    cfg = make_cfg()
    store = build_store(cfg)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(orjson.dumps(r).decode() for r in [
        {"id": "capital", "prompt": "The capital of France is"},
        {"id": "count", "prompt": "One, two, three,", "max_tokens": 6},
        {"id": "gpu", "prompt": "A GPU is"},
    ]) + "\n")
    return store.put(gemma_path, MODEL).oid, store.put(str(prompts), PROMPTS).oid


def infer_cfg(make_cfg, stored, *extra):
    model, prompts = stored
    return make_cfg("pipeline=run_infer", f"model.hash={model}", f"prompts.hash={prompts}", *FAST, *extra)


def test_client_against_a_real_server(external_server):
    client = CompletionClient(external_server.url)
    assert client.healthy()
    done = client.complete("The capital of France is", max_tokens=5)
    assert done.ok and done.text and 0 < done.tokens_predicted <= 5
    assert done.ttft_ms is not None and done.ttft_ms <= done.elapsed_ms
    again = client.complete("The capital of France is", max_tokens=5)
    assert again.text == done.text  # temperature 0, fixed seed


def test_run_infer_end_to_end_local(make_cfg, stored):
    result = run(infer_cfg(make_cfg, stored))
    m = result.manifest
    assert m["status"] == "completed"
    assert list(m["stages"]) == ["fetch_model", "fetch_prompts", "load_model", "inference", "upload_results"]
    inf = m["stages"]["inference"]["metrics"]
    assert inf["prompts_processed"] == 3 and inf["prompts_failed"] == 0
    assert 0 < inf["tokens_generated"] <= 8 + 6 + 8
    assert inf["tokens_per_sec"] > 0 and inf["latency_ms"]["p50"] > 0 and inf["ttft_ms"]["p50"] > 0
    assert m["stages"]["load_model"]["metrics"]["model_load_ms"] > 0
    folder = result.folder
    assert os.path.exists(os.path.join(folder, "stages", "load_model", "llama-server.log"))
    rows = [orjson.loads(x) for x in open(os.path.join(folder, "stages", "inference", "results.jsonl"), "rb")]
    assert [r["id"] for r in rows] == ["capital", "count", "gpu"]
    assert all(r["success"] and r["response"] and r["elapsed_ms"] > 0 and "timestamp" in r for r in rows)
    assert "results" == m["artifacts"]["upload_results.results"]["kind"]


def test_two_runs_identical_and_reproduce_equal_with_warm_model_cache(make_cfg, stored):
    cfg = infer_cfg(make_cfg, stored)
    first = run(cfg)
    second = run(cfg)
    h1 = first.manifest["artifacts"]["upload_results.results"]["hash"]
    assert second.manifest["artifacts"]["upload_results.results"]["hash"] == h1
    fetch = second.manifest["stages"]["fetch_model"]
    assert fetch["cache_hit"]  # warm: the model is not fetched again
    assert not second.manifest["stages"]["inference"]["cache_hit"]  # inference really ran
    result, comparison = from_config.reproduce(cfg, build_store(cfg), LocalCache(cfg.cache_dir), first.run_id,
                                               out=io.StringIO())
    assert comparison["upload_results.results"] is True


def test_run_infer_on_seaweedfs(make_cfg, seaweed, gemma_path, tmp_path):
    backend = ["backend=seaweedfs", f"backend.filer_url={seaweed.filer_url}", f"backend.root=infer-{tmp_path.name}"]
    cfg = make_cfg(*backend)
    store = build_store(cfg)
    model = store.put(gemma_path, MODEL).oid
    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text('{"id": "a", "prompt": "Hello"}\n')
    prompts = store.put(str(prompts_file), PROMPTS).oid
    result = run(make_cfg("pipeline=run_infer", f"model.hash={model}", f"prompts.hash={prompts}", *FAST, *backend))
    assert result.manifest["status"] == "completed"
    assert store.fs.exists(store.backend.path("runs", result.run_id, "stages", "inference", "results.jsonl"))


def test_failing_prompt_is_recorded_and_the_rest_go_on(make_cfg, gemma_path, tmp_path):
    cfg = make_cfg()
    store = build_store(cfg)
    prompts = tmp_path / "p.jsonl"
    too_long = "word " * 3000  # beyond the 512-token context of a slot
    prompts.write_text(orjson.dumps({"id": "ok", "prompt": "Hello"}).decode() + "\n"
                       + orjson.dumps({"id": "too_long", "prompt": too_long}).decode() + "\n")
    stored = (store.put(gemma_path, MODEL).oid, store.put(str(prompts), PROMPTS).oid)
    result = run(infer_cfg(make_cfg, stored))
    inf = result.manifest["stages"]["inference"]["metrics"]
    assert (inf["prompts_processed"], inf["prompts_failed"]) == (1, 1)
    assert inf["failures"][0]["id"] == "too_long" and inf["failures"][0]["error"]
    rows = [orjson.loads(x) for x in open(os.path.join(result.folder, "stages", "inference", "results.jsonl"), "rb")]
    assert [r["success"] for r in rows] == [True, False]


def test_llama_batch_and_client_against_an_external_server(make_cfg, external_server, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n{"prompt": "Bye", "max_tokens": 3}\n')
    ext = ["engine=external", f"engine.url={external_server.url}", f"prompts.path={prompts}", "infer.max_tokens=4",
           "engine.parallel=2"]
    batch = run(make_cfg("pipeline=llama_batch", *ext))
    metrics = batch.manifest["stages"]["inference"]["metrics"]
    assert metrics["prompts_processed"] == 2 and metrics["concurrency"] == 2
    assert "store_results.results" in batch.manifest["artifacts"]
    client = run(make_cfg("pipeline=llama_client", *ext))
    lat = client.manifest["stages"]["inference"]["metrics"]["latency_ms"]
    assert lat["p50"] <= lat["p95"] <= lat["p99"]
    assert external_server.alive()  # an external server is not ours to stop


def test_unreachable_external_engine_fails_the_run(make_cfg, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    with pytest.raises(RunFailed, match="external engine at http://127.0.0.1:9 is not answering"):
        run(make_cfg("pipeline=llama_client", "engine=external", "engine.url=http://127.0.0.1:9",
                     f"prompts.path={prompts}"))


def test_server_that_dies_fails_the_run_and_nothing_is_left(make_cfg, stored, tmp_path):
    model, prompts = stored
    env = dict(os.environ, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.Popen([SLP, "pipeline=run_infer", f"model.hash={model}", f"prompts.hash={prompts}",
                             "infer.max_tokens=400", "engine.ctx_size=512", "engine.parallel=1",
                             f"runner.runs_dir={tmp_path / 'runs'}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = threading.Event()

    def kill_server_once_generating():
        deadline = time.time() + 120
        while time.time() < deadline and not killed.is_set():
            # started by the worker that runs the command (slp_runner/server.py): found by
            # the model path under this test's cache, not as a child of proc
            mine = [p for p in llama_servers() if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
            # Only once the inference stage runs (the model is loaded): on a loaded
            # machine a fixed delay could land while the model is still loading.
            generating = glob.glob(str(tmp_path / "runs" / ".staging" / "*" / "logs" / "inference.log"))
            if mine and generating:
                time.sleep(1)  # prompts in flight
                mine[0].send_signal(signal.SIGKILL)
                killed.set()
            time.sleep(0.2)

    threading.Thread(target=kill_server_once_generating, daemon=True).start()
    _, err = proc.communicate(timeout=300)
    assert killed.is_set()
    assert proc.returncode == 1
    assert "died" in err or "stopped answering" in err, err
    (rid,) = [d for d in os.listdir(tmp_path / "runs") if d.startswith("run-")]
    m = orjson.loads((tmp_path / "runs" / rid / "manifest.json").read_bytes())
    assert m["status"] == "failed" and m["stages"]["upload_results"]["status"] == "skipped"
