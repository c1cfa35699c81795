"""Network faults on real services: a TCP fault proxy (tests/faultproxy.py) between
slp and the session's SeaweedFS filer or S3 gateway cuts, resets and slows
connections; nothing is mocked."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from slp_runner.artifacts import BLOB
from slp_runner.backends import s3_backend, seaweedfs_backend
from slp_runner.backends.s3_uploads import uploads_in_progress
from slp_runner.cache import LocalCache
from slp_runner.errors import BackendError
from slp_runner.hashing import hash_file
from slp_runner.store import INCOMING, ArtifactStore

from faultproxy import FaultProxy
from seaweed_cluster import default_signals

MiB = 1024 * 1024
SLP = os.path.join(os.path.dirname(sys.executable), "slp")


def write_blob(path, size: int) -> str:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(block[i % 251 :] + block[: i % 251])  # distinct blocks, cheap to make
    return str(path)


@pytest.fixture
def root():
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def filer_proxy(seaweed):
    with FaultProxy(seaweed.ports.filer) as proxy:
        yield proxy


@pytest.fixture
def stored(seaweed, root, tmp_path):
    """A 64 MiB blob put straight on the filer (no proxy): ``(oid, size)``."""
    store = ArtifactStore(seaweedfs_backend(filer_url=seaweed.filer_url, root=root))
    put = store.put(write_blob(tmp_path / "blob.bin", 64 * MiB), BLOB)
    return put.oid, put.size


def leftovers(folder) -> list[str]:
    return sorted(n for _, _, names in os.walk(folder) for n in names if n.endswith((".part", ".partial")))


def test_filer_get_cut_at_90_percent_resumes_with_a_range(filer_proxy, stored, root, tmp_path):
    oid, size = stored
    filer_proxy.drop_after_down, filer_proxy.drop_first = int(size * 0.9), 1
    via = ArtifactStore(seaweedfs_backend(filer_url=filer_proxy.url, root=root, retries=3, backoff=0.05))
    cache = LocalCache(str(tmp_path / "cache"))

    got = cache.get(via, BLOB, oid)

    assert filer_proxy.cuts == 1
    assert got.reconnects == 1 and got.resumed_from == 0
    # The second GET asked for the rest only, from about where the first was cut.
    assert [r for r in filer_proxy.ranges if abs(r - 0.9 * size) < MiB], filer_proxy.ranges
    assert filer_proxy.bytes_down < size + 2 * MiB
    assert hash_file(got.path).blake3 == oid
    assert leftovers(cache.root) == []


def test_filer_get_through_a_proxy_that_drops_range_still_resumes_right(filer_proxy, stored, root, tmp_path):
    # A resumed get asks for the rest with a Range; a proxy that does not pass it on gets
    # the whole file back. The bytes before the kept ones are read and dropped.
    oid, size = stored
    filer_proxy.drop_range = True
    via = ArtifactStore(seaweedfs_backend(filer_url=filer_proxy.url, root=root, retries=3, backoff=0.05))
    cache = LocalCache(str(tmp_path / "cache"))
    kept = 5 * MiB + 3
    partial = cache.partial_path(BLOB, oid)
    os.makedirs(os.path.dirname(partial))
    with open(partial, "wb") as out:
        via.stream_object(via.object_path(BLOB, oid), out.write)  # the whole file, over the proxy
        out.truncate(kept)

    got = cache.get(via, BLOB, oid)

    assert got.resumed_from == kept and filer_proxy.ranges == [kept]
    assert hash_file(got.path).blake3 == oid
    assert leftovers(cache.root) == []


def test_s3_get_with_ranged_parts_cut_completes(seaweed, tmp_path, root):
    direct = s3_backend(endpoint_url=seaweed.s3_url, bucket="slp-test", root=root,
                        key=seaweed.access_key, secret=seaweed.secret_key)
    put = ArtifactStore(direct).put(write_blob(tmp_path / "blob.bin", 40 * MiB), BLOB)
    with FaultProxy(seaweed.ports.s3) as proxy:
        # The first two connections die 3 MiB into their first 8 MiB part.
        proxy.drop_after_down, proxy.drop_first = 3 * MiB, 2
        via = ArtifactStore(s3_backend(endpoint_url=proxy.url, bucket="slp-test", root=root, retries=3,
                                       backoff=0.05, key=seaweed.access_key, secret=seaweed.secret_key))
        got = LocalCache(str(tmp_path / "cache")).get(via, BLOB, put.oid)
        assert proxy.cuts == 2 and proxy.connections > 2
    assert hash_file(got.path).blake3 == put.oid


def test_get_killed_part_way_resumes_from_its_partial(seaweed, filer_proxy, root, tmp_path):
    store = ArtifactStore(seaweedfs_backend(filer_url=seaweed.filer_url, root=root))
    put = store.put(write_blob(tmp_path / "blob.bin", 32 * MiB), BLOB)
    cache_dir = tmp_path / "cache"
    partial = LocalCache(str(cache_dir)).partial_path(BLOB, put.oid)
    env = dict(os.environ, SLP_CACHE_DIR=str(cache_dir))
    args = [SLP, "task=get", f"hash={put.oid}", "backend=seaweedfs", f"backend.filer_url={filer_proxy.url}",
            f"backend.root={root}", "progress=false"]

    filer_proxy.delay, filer_proxy.chunk = 0.01, 64 * 1024  # about 6 MiB/s
    child = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=default_signals)
    try:
        deadline = time.monotonic() + 25
        while not (os.path.exists(partial) and os.path.getsize(partial) > 8 * MiB):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the get never got 8 MiB in"
            time.sleep(0.05)
        child.kill()
    finally:
        child.kill()
        child.wait(10)
    kept = os.path.getsize(partial)
    assert 8 * MiB < kept < put.size

    filer_proxy.heal()
    before = filer_proxy.bytes_down
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, preexec_fn=default_signals)
    assert again.returncode == 0, again.stderr
    resumed = int(re.search(r"Resumed from (\d+) bytes", again.stdout).group(1))
    assert resumed == kept
    assert filer_proxy.bytes_down - before < put.size - kept + MiB  # only the rest came over the wire
    said = float(re.search(r"Downloaded ([\d.]+) MiB", again.stdout).group(1))  # what it fetched, not the whole
    assert abs(said - (put.size - kept) / MiB) < 0.1, again.stdout
    assert hash_file(LocalCache(str(cache_dir)).path_for(BLOB, put.oid)).blake3 == put.oid
    assert leftovers(cache_dir) == []


def test_put_with_first_connection_cut_is_retried_and_verifies(seaweed, filer_proxy, root, tmp_path):
    path = write_blob(tmp_path / "blob.bin", 24 * MiB)
    filer_proxy.drop_after_up, filer_proxy.drop_first, filer_proxy.reset = 10 * MiB, 1, True
    via = ArtifactStore(seaweedfs_backend(filer_url=filer_proxy.url, root=root, retries=3, backoff=0.05))

    put = via.put(path, BLOB)

    assert put.uploaded and filer_proxy.cuts == 1
    direct = ArtifactStore(seaweedfs_backend(filer_url=seaweed.filer_url, root=root))
    assert direct.verify(BLOB, put.oid).ok
    assert _incoming(direct) == []


def test_put_whose_every_connection_is_cut_fails_once_and_shows_nothing(seaweed, filer_proxy, root, tmp_path):
    path = write_blob(tmp_path / "blob.bin", 24 * MiB)
    oid = hash_file(path).blake3
    filer_proxy.drop_after_up = 10 * MiB  # every connection: small requests pass, the upload never does
    via = ArtifactStore(seaweedfs_backend(filer_url=filer_proxy.url, root=root, retries=2, backoff=0.05))

    with pytest.raises(BackendError) as err:
        via.put(path, BLOB)

    message = str(err.value)
    assert "\n" not in message and re.search(r"after 3 attempts over \d+\.\d s", message), message
    direct = ArtifactStore(seaweedfs_backend(filer_url=seaweed.filer_url, root=root))
    assert oid not in [o["oid"] for o in direct.list(BLOB)]
    assert not direct.exists(BLOB, oid)
    assert _incoming(direct) == []


def test_retries_give_up_after_the_configured_attempts_in_one_line():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = ArtifactStore(seaweedfs_backend(filer_url=f"http://127.0.0.1:{port}", root="x", retries=2, backoff=0.05))

    t0 = time.monotonic()
    with pytest.raises(BackendError) as err:
        store.size_of(BLOB, "0" * 64)
    took = time.monotonic() - t0

    message = str(err.value)
    assert "\n" not in message
    assert re.search(rf"unreachable at http://127\.0\.0\.1:{port}/x after 3 attempts over \d+\.\d s", message), message
    # urllib3's schedule: the first retry at once, the second after 2 x backoff (+ up to backoff of jitter).
    assert 0.1 <= took < 3, took
    with pytest.raises(ConnectionError, match=rf"SeaweedFS filer unreachable at http://127\.0\.0\.1:{port} "
                                              r"after 3 attempts over \d+\.\d s \(GET /x/blobs/0+\.bin\)"):
        store.fs.info(store.object_path(BLOB, "0" * 64))


def _incoming(store: ArtifactStore) -> list[str]:
    try:
        return store.fs.ls(store.backend.path(INCOMING), detail=False)
    except FileNotFoundError:
        return []


def test_filer_put_cut_part_way_leaves_what_was_there(seaweed, filer_proxy, root):
    # What the store's one-PUT manifest writes on the filer (Backend.atomic_put) rely on:
    # the filer replaces an entry only once the whole body is stored, past several chunks.
    direct = seaweedfs_backend(filer_url=seaweed.filer_url, root=root).fs
    path = f"{root}/manifest.json"
    direct.pipe_file(path, b"the sound old bytes")
    filer_proxy.drop_after_up = 6 * MiB  # the filer cuts files into 4 MiB chunks
    via = seaweedfs_backend(filer_url=filer_proxy.url, root=root, retries=0).fs

    with pytest.raises(ConnectionError):
        via.pipe_file(path, os.urandom(9 * MiB))

    assert filer_proxy.cuts == 1
    assert direct.cat_file(path) == b"the sound old bytes"
    assert direct.ls(root, detail=False) == [path]


def _s3_via(proxy, seaweed, root, retries):
    return ArtifactStore(s3_backend(endpoint_url=proxy.url, bucket="slp-test", root=root, retries=retries,
                                    backoff=0.05, key=seaweed.access_key, secret=seaweed.secret_key))


def test_s3_put_with_its_parts_cut_is_retried_and_verifies(seaweed, root, tmp_path):
    # A multipart upload (40 MiB: five parts through the parts client's own connections):
    # every connection dies 3 MiB into an upload until the proxy heals; botocore retries.
    path = write_blob(tmp_path / "blob.bin", 40 * MiB)
    with FaultProxy(seaweed.ports.s3) as proxy:
        proxy.drop_after_up, proxy.reset = 3 * MiB, True
        via = _s3_via(proxy, seaweed, root, retries=4)
        via.backend.ensure_writable()

        def heal_after_a_cut():
            deadline = time.monotonic() + 30
            while proxy.cuts < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            proxy.heal()

        healer = threading.Thread(target=heal_after_a_cut)
        healer.start()
        try:
            put = via.put(path, BLOB)
        finally:
            healer.join()
        assert put.uploaded and proxy.cuts >= 1
    direct = ArtifactStore(s3_backend(endpoint_url=seaweed.s3_url, bucket="slp-test", root=root,
                                      key=seaweed.access_key, secret=seaweed.secret_key))
    assert direct.verify(BLOB, put.oid).ok
    assert list(uploads_in_progress(direct.fs, direct.backend.root)) == []


def test_s3_put_whose_parts_never_get_through_fails_once_and_shows_nothing(seaweed, root, tmp_path):
    path = write_blob(tmp_path / "blob.bin", 40 * MiB)
    oid = hash_file(path).blake3
    with FaultProxy(seaweed.ports.s3) as proxy:
        proxy.drop_after_up, proxy.reset = 3 * MiB, True  # small requests pass, no part ever does
        via = _s3_via(proxy, seaweed, root, retries=1)
        with pytest.raises(BackendError) as err:
            via.put(path, BLOB)
    message = str(err.value)
    assert "\n" not in message and re.search(r"unreachable at .* after up to 2 attempts over [\d.]+ s \(storing ", message), message
    direct = ArtifactStore(s3_backend(endpoint_url=seaweed.s3_url, bucket="slp-test", root=root,
                                      key=seaweed.access_key, secret=seaweed.secret_key))
    assert not direct.exists(BLOB, oid)
    assert direct.list(BLOB) == []
    assert list(uploads_in_progress(direct.fs, direct.backend.root)) == []  # aborted, not left to bill


@pytest.mark.parametrize("size", [8 * MiB, 40 * MiB], ids=["one-put", "multipart"])
def test_s3_put_damaged_on_the_wire_is_refused_and_shows_nothing(seaweed, root, tmp_path, size):
    # One byte of the body flipped between client and server, past every check of the
    # client's own: the CRC32 sent with each body (payload unsigned) is what the server
    # checks, so it refuses the body, and nothing is visible under the hash.
    path = write_blob(tmp_path / "blob.bin", size)
    oid = hash_file(path).blake3
    with FaultProxy(seaweed.ports.s3) as proxy:
        proxy.damage_up_at = 4 * MiB
        via = _s3_via(proxy, seaweed, root, retries=1)
        with pytest.raises(BackendError) as err:
            via.put(path, BLOB)
        assert proxy.damaged >= 1
        message = str(err.value)
        assert "\n" not in message and "received bytes other than those sent" in message, message
        direct = ArtifactStore(s3_backend(endpoint_url=seaweed.s3_url, bucket="slp-test", root=root,
                                          key=seaweed.access_key, secret=seaweed.secret_key))
        assert not direct.exists(BLOB, oid)
        assert direct.list(BLOB) == []
        assert list(uploads_in_progress(direct.fs, direct.backend.root)) == []
        proxy.heal()  # the same put over a sound link: stored and sound
        put = via.put(path, BLOB)
        assert put.uploaded and put.oid == oid
        assert direct.verify(BLOB, oid).ok
