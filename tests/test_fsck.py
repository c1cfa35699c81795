"""slp task=fsck: what faults leave behind is found, and with fix=true removed or
mended, on the real backends; damage keeps the exit code non-zero."""

import os
import signal
import subprocess
import time
import uuid

import pytest

from conftest import make_backend
from seaweed_cluster import default_signals
from slp_runner.artifacts import BLOB
from slp_runner.store import INCOMING, ArtifactStore
from test_cli import SLP, hash_of
from test_integrity import cli_backend, cli_store


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    return e


def slp(env, *args):
    return subprocess.run([SLP, *args], env=env, capture_output=True, text=True, timeout=300)


def big_file(path, mib):
    block = os.urandom(1024 * 1024)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(block[:-8] + i.to_bytes(8, "little"))
    return path


def leftovers(name, store):
    """What a killed put can leave: .incoming parts, or S3 multipart uploads."""
    if name == "s3":
        from slp_runner.backends.s3_uploads import uploads_in_progress

        return [u["Key"] for u in uploads_in_progress(store.fs, store.backend.root)]
    store.fs.invalidate_cache()
    try:
        return [e["name"] for e in store.fs.ls(store.backend.path(INCOMING), detail=True) if e["type"] == "file"]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("name", ["local", "seaweedfs", "s3"])
def test_kill_9_during_put_then_fsck_fix(name, env, tmp_path, seaweed):
    args = cli_backend(name, seaweed, env) if name != "local" else []
    store = cli_store(args, seaweed, tmp_path) if name != "local" else ArtifactStore(make_backend("local", None, tmp_path))
    size = 1024 if name == "local" else 256
    path = big_file(tmp_path / "big.bin", size)
    # The filer shows an upload only once its PUT completed: the window a kill can hit
    # is between that PUT and the rename, which a re-read of the stored bytes widens.
    slow = ["verify_upload=rehash"] if name == "seaweedfs" else []
    proc = subprocess.Popen([SLP, "task=put", "kind=blob", f"path={path}", *args, *slow], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=default_signals)
    deadline = time.time() + 60
    found = []
    while time.time() < deadline and proc.poll() is None and not found:
        found = leftovers(name, store)
        time.sleep(0.005 if name == "local" else 0.05)
    proc.kill()
    proc.wait()
    assert found, "the put finished before it could be killed mid-way"
    assert leftovers(name, store)  # the fault left something behind

    dry = slp(env, "task=fsck", "grace=0", *args)
    assert dry.returncode == 0, dry.stderr
    assert ("multipart-upload" if name == "s3" else "incoming") in dry.stdout
    assert leftovers(name, store)  # a dry run changes nothing
    fixed = slp(env, "task=fsck", "fix=true", "grace=0", *args)
    assert fixed.returncode == 0, fixed.stderr
    assert "(removed)" in fixed.stdout
    assert leftovers(name, store) == []
    oid = __import__("blake3").blake3(path.read_bytes()).hexdigest()
    assert not store.exists(BLOB, oid)  # nothing half-visible under the hash


def test_grace_period_protects_a_put_in_flight(env, tmp_path):
    store = ArtifactStore(make_backend("local", None, tmp_path))
    part = store.backend.path(INCOMING, f"{uuid.uuid4().hex}.part")
    store.fs.pipe_file(part, b"in flight elsewhere")
    out = slp(env, "task=fsck", "fix=true")  # default grace: 24 h
    assert out.returncode == 0 and "incoming" not in out.stdout
    assert store.fs.exists(part)


@pytest.mark.parametrize("name", ["local", "seaweedfs", "s3"])
def test_orphan_manifests_and_objects(name, env, tmp_path, seaweed, small_file, prompts_file):
    args = cli_backend(name, seaweed, env) if name != "local" else []
    store = cli_store(args, seaweed, tmp_path) if name != "local" else ArtifactStore(make_backend("local", None, tmp_path))
    blob = hash_of(slp(env, "task=put", "kind=blob", f"path={small_file}", *args).stdout)
    prompts = hash_of(slp(env, "task=put", "kind=prompts", f"path={prompts_file}", *args).stdout)
    store.fs.rm(store.object_path(BLOB, blob))  # lost object: its manifest is an orphan
    from slp_runner.artifacts import PROMPTS
    store.fs.rm(store.manifest_path(PROMPTS, prompts))  # an object without manifest

    dry = slp(env, "task=fsck", "grace=0", *args)
    assert dry.returncode == 1  # an object without manifest is damage until mended
    assert "orphan-manifest" in dry.stdout and "no-manifest" in dry.stdout
    fixed = slp(env, "task=fsck", "fix=true", "grace=0", *args)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    store.fs.invalidate_cache()
    assert not store.fs.exists(store.manifest_path(BLOB, blob))
    rebuilt = store.read_manifest(PROMPTS, prompts)
    assert rebuilt["blake3"] == prompts and rebuilt["size_bytes"] == prompts_file.stat().st_size
    assert rebuilt["integrity"]["verification_method"] == "rehash"
    again = slp(env, "task=fsck", "grace=0", "sample=1", *args)
    assert again.returncode == 0 and "0 damaged, 0 leftovers" in again.stdout


def test_sampled_rehash_reports_damage_and_fix_does_not_hide_it(env, tmp_path, small_file):
    store = ArtifactStore(make_backend("local", None, tmp_path))
    oid = hash_of(slp(env, "task=put", "kind=blob", f"path={small_file}").stdout)
    data = bytearray(small_file.read_bytes())
    data[7] ^= 1
    store.fs.pipe_file(store.object_path(BLOB, oid), bytes(data))
    assert slp(env, "task=fsck").returncode == 0  # without reading bytes nothing shows
    for extra in ([], ["fix=true"]):
        out = slp(env, "task=fsck", "sample=1.0", *extra)
        assert out.returncode == 1 and "corrupt-object" in out.stdout and oid in out.stdout


def test_stale_cache_locks_and_parts_but_not_held_locks(env, tmp_path, small_file):
    from filelock import FileLock

    oid = hash_of(slp(env, "task=put", "kind=blob", f"path={small_file}").stdout)
    assert slp(env, "task=get", f"hash={oid}").returncode == 0
    folder = tmp_path / "cache" / "blobs"
    stale_lock, held_lock, part = folder / ("a" * 64 + ".bin.lock"), folder / ("b" * 64 + ".bin.lock"), folder / ".aaaa.x.part"
    stale_lock.write_bytes(b"")
    part.write_bytes(b"half a download")
    holder = FileLock(str(held_lock))
    holder.acquire()  # another get, in this process, holds it
    try:
        out = slp(env, "task=fsck", "fix=true", "grace=0")
    finally:
        holder.release()
    assert out.returncode == 0, out.stderr
    assert not stale_lock.exists() and not part.exists()
    assert held_lock.exists()
    assert (folder / f"{oid}.bin").exists() and (folder / f"{oid}.bin.lock").exists()  # an entry's own lock stays


def test_bad_fsck_settings_are_one_line(env):
    for args, message in ((["grace=soon"], "grace='soon'"), (["sample=2"], "sample=2.0")):
        out = slp(env, "task=fsck", *args)
        assert out.returncode == 1 and out.stderr.strip().startswith(f"slp: error: {message}")
