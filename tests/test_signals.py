"""Stop signals and runs left behind, with real `slp` processes: SIGTERM and SIGHUP finish
a run as Ctrl-C does (interrupted, engine stopped, folder finalized and published, exit
128+signal); a run killed with SIGKILL is listed as abandoned and can be finalized or
cleaned, while a live run is never touched."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import orjson
import psutil
import pytest

from slp_runner.errors import NotAbandoned
from slp_runner.pipeline.abandoned import find_abandoned, finalize_abandoned, remove_abandoned, staging_runs
from slp_runner.pipeline.run_folder import RunFolder, new_run_id
from seaweed_cluster import default_signals
from test_cli import SLP, slp
from test_server import gone
from conftest import TEST_CONF

TESTS = ["hydra.searchpath=[file://" + TEST_CONF + "]"]


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    return e


_default_signals = default_signals  # a suite started from a background job inherits SIGINT ignored


def start(env, *args):
    return subprocess.Popen([SLP, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)


def staging_of(runs, proc, timeout=30.0) -> str:
    """The run id of the staging folder ``proc`` owns, once it exists."""
    deadline = time.time() + timeout
    staging = os.path.join(runs, ".staging")
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        for name in os.listdir(staging) if os.path.isdir(staging) else []:
            try:
                with open(os.path.join(staging, name, ".owner"), "rb") as f:
                    if orjson.loads(f.read())["pid"] == proc.pid:
                        return name
            except (OSError, ValueError):
                pass
        time.sleep(0.05)
    raise AssertionError(f"no staging folder of pid {proc.pid} after {timeout}s")


def manifest(runs, rid):
    return orjson.loads(open(os.path.join(runs, rid, "manifest.json"), "rb").read())


def line_of(text, rid):
    (line,) = [ln for ln in text.splitlines() if ln.startswith(rid)]
    return line


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_stop_signal_finalizes_and_publishes_the_run(env, tmp_path, sig, code):
    runs = str(tmp_path / "runs")
    proc = start(env, *TESTS, "pipeline=slow", f"runner.runs_dir={runs}")
    rid = staging_of(runs, proc)
    time.sleep(0.5)  # the stage is running
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"slp: interrupted ({sig.name})"
    m = manifest(runs, rid)
    assert (m["status"], m["signal"], m["stages"]["wait"]["status"]) == ("interrupted", sig.name, "interrupted")
    assert os.listdir(os.path.join(runs, ".staging")) == []
    final = os.path.join(runs, rid)
    assert ".owner" not in os.listdir(final)
    assert not os.stat(os.path.join(final, "manifest.json")).st_mode & 0o222
    published = tmp_path / "store" / "runs" / rid / "manifest.json"
    assert orjson.loads(published.read_bytes())["signal"] == sig.name
    assert f"published 5 files" in out


def test_more_signals_while_stopping(env, tmp_path):
    """The second signal is noted and the shutdown goes on; the third exits at once.
    The backend is unreachable, so the upload retries long enough to signal into it."""
    runs = str(tmp_path / "runs")
    proc = start(env, *TESTS, "pipeline=slow", f"runner.runs_dir={runs}", "backend=seaweedfs",
                 "backend.filer_url=http://127.0.0.1:9")
    rid = staging_of(runs, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 20  # the folder is written before the upload starts
    while time.time() < deadline and not os.path.exists(os.path.join(runs, rid, "manifest.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert proc.poll() is None  # still trying to publish
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert time.time() - t0 < 3
    assert proc.returncode == 143, err  # the first signal's code
    assert "SIGHUP while stopping" in err
    m = manifest(runs, rid)
    assert (m["status"], m["signal"]) == ("interrupted", "SIGTERM")
    assert os.listdir(os.path.join(runs, ".staging")) == []


def test_unpublished_interrupted_run_keeps_its_folder(env, tmp_path):
    runs = str(tmp_path / "runs")
    (tmp_path / "a-file").write_bytes(b"")
    proc = start(env, *TESTS, "pipeline=slow", f"runner.runs_dir={runs}", f"backend.root={tmp_path / 'a-file'}/store")
    rid = staging_of(runs, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    (line,) = [ln for ln in out.splitlines() if "not published" in ln]
    assert "a-file" in line and line.endswith(f"the run folder stays at {os.path.join(runs, rid)}")
    assert manifest(runs, rid)["status"] == "interrupted"


def _kill9(proc):
    proc.kill()
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def test_killed_runs_are_abandoned_then_finalized_or_cleaned(env, tmp_path):
    runs = str(tmp_path / "runs")
    alive = start(env, *TESTS, "pipeline=long", f"runner.runs_dir={runs}")
    killed = start(env, *TESTS, "pipeline=slow", f"runner.runs_dir={runs}")
    try:
        live = staging_of(runs, alive)
        first = staging_of(runs, killed)
        time.sleep(0.5)
        _kill9(killed)
        listing = slp(env, "task=runs", f"runner.runs_dir={runs}")
        assert listing.returncode == 0, listing.stderr
        assert "abandoned" in line_of(listing.stdout, first) and "slow" in line_of(listing.stdout, first)
        assert "running" in line_of(listing.stdout, live) and f"pid {alive.pid}" in line_of(listing.stdout, live)
        assert "op=finalize" in listing.stdout

        fin = slp(env, "task=runs", "op=finalize", f"runner.runs_dir={runs}")
        assert fin.returncode == 0, fin.stderr
        assert f"finalized {first} as abandoned" in fin.stdout
        m = manifest(runs, first)
        assert (m["status"], m["abandoned"], m["pipeline"]) == ("abandoned", True, "slow")
        assert m["stages"]["wait"]["status"] == "abandoned" and m["start_time"].startswith("20")
        assert m["owner"] == {"pid": killed.pid, "host": socket.gethostname()}
        assert not os.stat(os.path.join(runs, first, "manifest.json")).st_mode & 0o222
        assert ".owner" not in os.listdir(os.path.join(runs, first))
        listing = slp(env, "task=runs", f"runner.runs_dir={runs}").stdout
        assert "abandoned" in line_of(listing, first) and ".staging" not in line_of(listing, first)

        second_proc = start(env, *TESTS, "pipeline=slow", f"runner.runs_dir={runs}")
        second = staging_of(runs, second_proc)
        _kill9(second_proc)
        clean = slp(env, "task=runs", "op=clean", f"runner.runs_dir={runs}")
        assert clean.returncode == 0, clean.stderr
        assert f"removed abandoned {second}" in clean.stdout
        assert sorted(os.listdir(os.path.join(runs, ".staging"))) == [live]  # no hidden leftovers either
        assert not os.path.exists(os.path.join(runs, second))
        again = slp(env, "task=runs", "op=clean", f"runner.runs_dir={runs}")
        assert "no abandoned runs" in again.stdout
        # the live run was never touched, and is refused by name
        refused = slp(env, "task=runs", "op=clean", f"run={live}", f"runner.runs_dir={runs}")
        assert refused.returncode == 1 and f"run {live} is running" in refused.stderr
        assert alive.poll() is None
        assert os.path.exists(os.path.join(runs, ".staging", live, "config.yaml"))
    finally:
        for p in (alive, killed):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
    alive.communicate(timeout=30)
    assert alive.returncode == 143
    assert manifest(runs, live)["status"] == "interrupted"


def _dead_owner_folder(runs, then="") -> str:
    """A staging folder made by a process that then died without finishing."""
    code = ("import os, sys; from slp_runner.pipeline.run_folder import RunFolder, new_run_id\n"
            "f = RunFolder(sys.argv[1], new_run_id(b'x')); f.write_bytes('logs/a.log', b'')\n"
            f"{then}\nprint(f.run_id, flush=True); os._exit(0)")
    done = subprocess.run([sys.executable, "-c", code, runs], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_finalize_keeps_a_manifest_the_dead_process_wrote(tmp_path):
    runs = str(tmp_path / "runs")
    rid = _dead_owner_folder(runs, then="f.write_json('manifest.json', {'run_id': f.run_id, 'status': 'interrupted', "
                                        "'signal': 'SIGTERM', 'stages': {}})")
    final = finalize_abandoned(runs, rid)
    m = manifest(runs, rid)
    assert (m["status"], m["signal"], m["abandoned"]) == ("interrupted", "SIGTERM", True)
    assert finalize_abandoned(runs, rid) == final  # done already


def test_find_is_side_effect_free_and_remove_is_idempotent(tmp_path):
    runs = str(tmp_path / "runs")
    rid = _dead_owner_folder(runs)
    found = find_abandoned(runs)
    assert [(r["run_id"], r["status"], r["stages"]) for r in found] == [(rid, "abandoned", ["a"])]
    assert find_abandoned(runs) == found  # looking changes nothing
    assert remove_abandoned(runs, rid) is True
    assert remove_abandoned(runs, rid) is False
    assert find_abandoned(runs) == [] and os.listdir(os.path.join(runs, ".staging")) == []


def test_live_foreign_and_ownerless_folders_are_left_alone(tmp_path):
    runs = str(tmp_path / "runs")
    mine = RunFolder(runs, new_run_id(b"live"))  # this process is alive: its lock holds
    staging = os.path.join(runs, ".staging")
    foreign, ownerless = new_run_id(b"foreign"), new_run_id(b"ownerless")
    os.makedirs(os.path.join(staging, foreign))
    with open(os.path.join(staging, foreign, ".owner"), "wb") as f:
        f.write(orjson.dumps({"run_id": foreign, "pid": 1, "host": "another-node", "start_time": "x"}))
    os.makedirs(os.path.join(staging, ownerless))
    states = {r["run_id"]: (r["status"], r["reason"]) for r in staging_runs(runs)}
    assert states == {mine.run_id: ("running", None), foreign: ("unknown", "owned by host 'another-node'"),
                      ownerless: ("unknown", "no owner record")}
    assert find_abandoned(runs) == []
    for rid in states:
        with pytest.raises(NotAbandoned, match=f"run {rid} is (running|unknown)"):
            remove_abandoned(runs, rid)
        with pytest.raises(NotAbandoned):
            finalize_abandoned(runs, rid)
    assert sorted(os.listdir(staging)) == sorted(states)
    final = mine.finalize()
    assert ".owner" not in os.listdir(final)
    assert remove_abandoned(runs, mine.run_id) is False  # finished: nothing to remove


def _random_file(path, mib=200):
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    return path


def _sigterm_once_a_part_file_appears(proc, under) -> None:
    deadline = time.time() + 30
    while time.time() < deadline and proc.poll() is None:
        if any(n.endswith((".part", ".partial")) for _, _, names in os.walk(under) for n in names):
            break  # the transfer is under way
        time.sleep(0.002)
    assert proc.poll() is None, "finished before a partial file was seen"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "slp: interrupted (SIGTERM)"


def _partial_files(root):
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names
            if n.endswith(".part") or ".incoming" in d]


def test_sigterm_during_a_put_leaves_no_partial_files(env, tmp_path):
    big = _random_file(tmp_path / "big.bin")
    proc = start(env, "task=put", "kind=blob", f"path={big}", "progress=false", "verify_upload=rehash")
    _sigterm_once_a_part_file_appears(proc, tmp_path / "store")
    assert _partial_files(tmp_path) == []
    for d, _, names in os.walk(tmp_path / "store"):  # whatever was published is whole
        for n in names:
            if not n.endswith(".json"):
                assert os.path.getsize(os.path.join(d, n)) == big.stat().st_size


def test_sigterm_during_a_get_leaves_no_partial_files(env, tmp_path):
    from slp_runner.artifacts import BLOB
    from slp_runner.backends import local_backend
    from slp_runner.store import ArtifactStore

    big = _random_file(tmp_path / "big.bin")
    oid = ArtifactStore(local_backend(root=str(tmp_path / "store"))).put(str(big), BLOB).oid
    big.unlink()
    proc = start(env, "task=get", f"hash={oid}", f"out={tmp_path / 'copy.bin'}", "progress=false")
    _sigterm_once_a_part_file_appears(proc, tmp_path / "cache")
    assert _partial_files(tmp_path) == []  # a resumable <hash>.partial may stay, by design
    assert not (tmp_path / "copy.bin").exists()
    for d, _, names in os.walk(tmp_path / "cache"):  # an entry under the hash is whole
        for n in names:
            if n.startswith(oid) and n.endswith(".bin"):
                assert os.path.getsize(os.path.join(d, n)) == 200 << 20


# -- inference: the managed llama-server stops with the run ---------------------------------------


def test_sigterm_during_inference_stops_the_llama_server(env, tmp_path, gemma_path, make_cfg):
    from slp_runner.artifacts import MODEL, PROMPTS
    from slp_runner.cli import build_store

    store = build_store(make_cfg())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(orjson.dumps({"id": f"p{i}", "prompt": f"Count to {i}:"}).decode() + "\n"
                               for i in range(40)))
    model, batch = store.put(gemma_path, MODEL).oid, store.put(str(prompts), PROMPTS).oid
    runs = str(tmp_path / "runs")
    proc = start(env, "pipeline=run_infer", f"model.hash={model}", f"prompts.hash={batch}", "infer.max_tokens=400",
                 "engine.ctx_size=512", "engine.parallel=1", f"runner.runs_dir={runs}")
    rid = staging_of(runs, proc)
    server = None
    deadline = time.time() + 90
    log = os.path.join(runs, ".staging", rid, "logs", "inference.log")
    while time.time() < deadline and proc.poll() is None:
        # started by the worker that runs the command (slp_runner/server.py), not by proc
        # itself: found by the model path under this test's cache
        kids = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                line = " ".join(p.cmdline())
                if "llama-server" in line and str(tmp_path) in line:
                    kids.append(p)
        if kids and os.path.exists(log):
            server = kids[0]
            break
        time.sleep(0.2)
    assert server is not None, "llama-server never started"
    time.sleep(2.0)  # prompts in flight
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    print(f"SIGTERM during inference: slp exited {time.time() - t0:.2f} s later")
    assert proc.returncode == 143, err
    gone_by = time.time() + 5
    while time.time() < gone_by and not gone(server):
        time.sleep(0.1)
    assert gone(server)
    m = manifest(runs, rid)
    assert (m["status"], m["signal"]) == ("interrupted", "SIGTERM")
    assert m["stages"]["inference"]["status"] == "interrupted"
    assert (tmp_path / "store" / "runs" / rid / "manifest.json").exists()
