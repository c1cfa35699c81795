"""A SeaweedFS volume server killed mid-transfer (issue 9): one clear error, nothing
half-visible, and the same transfer succeeds once the volume server is back.

Master, volume and filer run as separate real processes (tests/seaweed_cluster.py),
so the volume server alone can be SIGKILLed part-way through a 128 MiB put or get
and restarted on its data folder. Nothing is mocked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest

from slp_runner.artifacts import BLOB
from slp_runner.backends import seaweedfs_backend
from slp_runner.cache import LocalCache
from slp_runner.errors import BackendError
from slp_runner.hashing import hash_file
from slp_runner.store import INCOMING, ArtifactStore

from seaweed_cluster import SeaweedCluster, default_signals
from test_faults_network import write_blob

MiB = 1024 * 1024
SIZE = 128 * MiB
SLP = os.path.join(os.path.dirname(sys.executable), "slp")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SeaweedCluster(str(tmp_path_factory.mktemp("seaweed-cluster"))).start()
    yield c
    c.stop()


@pytest.fixture
def volume_up(cluster):
    """The cluster with its volume server running, before and after the test."""
    if "volume" not in cluster.procs:
        cluster.start_volume()
    yield cluster
    if "volume" not in cluster.procs:
        cluster.start_volume()


@pytest.fixture
def root():
    return f"t-{uuid.uuid4().hex[:12]}"


def wait_for(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.005)


def incoming(store: ArtifactStore) -> list[str]:
    try:
        return store.fs.ls(store.backend.path(INCOMING), detail=False)
    except FileNotFoundError:
        return []


def cache_leftovers(folder) -> list[str]:
    return sorted(n for _, _, names in os.walk(folder) for n in names if n.endswith((".part", ".partial")))


def test_put_with_volume_killed_part_way_fails_once_shows_nothing_and_succeeds_after_restart(volume_up, root,
                                                                                              tmp_path):
    cluster = volume_up
    path = write_blob(tmp_path / "blob.bin", SIZE)
    oid = hash_file(path).blake3
    # timeout=5: once its volume server is gone the filer stops reading the PUT body
    # (it retries assigning a file id for 30 s), so each attempt ends on the client's
    # socket timeout; 2 attempts (retries=1) keep the failure near 10 s.
    store = ArtifactStore(seaweedfs_backend(cluster.filer_url, root=root, retries=1, backoff=0.1, timeout=5))
    outcome: dict = {}

    def put():
        try:
            outcome["result"] = store.put(path, BLOB)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    before = cluster.volume_bytes()
    worker = threading.Thread(target=put, daemon=True)
    worker.start()
    # Kill once the filer has written 16 MiB of chunks to the volume: part-way for sure.
    wait_for(lambda: cluster.volume_bytes() - before >= 16 * MiB or not worker.is_alive(), 30, "16 MiB on the volume")
    assert worker.is_alive(), f"the put ended before the volume server was killed: {outcome}"
    cluster.kill_volume()
    t0 = time.monotonic()
    worker.join(45)
    took = time.monotonic() - t0
    assert not worker.is_alive(), "the put never returned after the volume server died"

    # One clear error: a BackendError, one line, naming the backend, the file and the attempts
    # (its hash is known only once the bytes are sent: a filer on this machine gets each
    # file read once, hashed as it goes out).
    assert "result" not in outcome, "the put claimed success with its volume server dead"
    err = outcome["error"]
    assert isinstance(err, BackendError), repr(err)
    message = str(err)
    assert "\n" not in message, message
    assert re.search(rf"seaweedfs backend .* at {re.escape(cluster.filer_url)}/{root} after 2 attempts over "
                     rf"\d+\.\d s \(storing {re.escape(str(path))}\)", message), message
    assert took < 30, took

    # Nothing visible: no object, no manifest, no listing entry, nothing in .incoming.
    # The filer creates an entry only once every chunk of the body is stored, so the
    # cut PUT never made one (not even a short one under .incoming/); the chunks it had
    # already written are orphans on the volume that no path names.
    assert not store.exists(BLOB, oid)
    assert not store.fs.exists(store.manifest_path(BLOB, oid))
    assert store.list(BLOB) == []
    assert incoming(store) == []

    cluster.start_volume()
    again = store.put(path, BLOB)
    assert again.uploaded and again.oid == oid and again.size == SIZE
    check = store.verify(BLOB, oid)
    assert check.ok, check.detail
    assert [o["oid"] for o in store.list(BLOB)] == [oid]
    # The filer handlers of the cut attempts were still retrying when the volume came
    # back: they must not publish a truncated body late.
    time.sleep(1)
    assert incoming(store) == []


def test_get_with_volume_killed_part_way_fails_once_keeps_a_partial_and_resumes_after_restart(volume_up, root,
                                                                                               tmp_path):
    cluster = volume_up
    store = ArtifactStore(seaweedfs_backend(cluster.filer_url, root=root))
    put = store.put(write_blob(tmp_path / "blob.bin", SIZE), BLOB)  # stored before the fault
    cache_dir = tmp_path / "cache"
    cache = LocalCache(str(cache_dir))
    partial, entry = cache.partial_path(BLOB, put.oid), cache.path_for(BLOB, put.oid)
    env = dict(os.environ, SLP_CACHE_DIR=str(cache_dir), SLP_STORE_ROOT=str(tmp_path / "store"))
    args = [SLP, "task=get", f"hash={put.oid}", "backend=seaweedfs", f"backend.filer_url={cluster.filer_url}",
            f"backend.root={root}", "backend.retries=1", "backend.backoff=0.1", "backend.timeout=10",
            "progress=false"]

    child = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=default_signals)
    try:
        wait_for(lambda: child.poll() is not None or (os.path.exists(partial) and os.path.getsize(partial) >= 8 * MiB),
                 30, "the get to be 8 MiB in")
        assert child.poll() is None, f"the get ended before the volume server was killed: {child.communicate()}"
        cluster.kill_volume()
        at_kill = os.path.getsize(partial)
        t0 = time.monotonic()
        out, err = child.communicate(timeout=45)
        took = time.monotonic() - t0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)

    # One clear error: exit 1 and exactly one stderr line, `slp: error: ...`, naming the object.
    assert child.returncode == 1, (child.returncode, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("slp: error: "), err
    assert f"blobs/{put.oid}.bin" in lines[0], lines[0]
    assert took < 30, took
    # Nothing under the hash in the cache; the bytes received are kept for a resume.
    assert not os.path.exists(entry) and not os.path.exists(entry + ".verified")
    kept = os.path.getsize(partial)
    assert at_kill <= kept < put.size, (at_kill, kept)
    assert cache_leftovers(cache_dir) == [os.path.basename(partial)]

    cluster.start_volume()
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, preexec_fn=default_signals)
    assert again.returncode == 0, again.stderr
    resumed = int(re.search(r"Resumed from (\d+) bytes", again.stdout).group(1))
    assert resumed == kept
    assert hash_file(entry).blake3 == put.oid
    assert cache_leftovers(cache_dir) == []
