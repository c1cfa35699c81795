"""A filer put sends the file while a thread hashes it and looks the hash up
(ArtifactStore.put): what it must never do, whatever the lookup finds or when it is
stopped. Real filer, real S3 gateway, real files changed under the put, a real slp
process stopped with SIGTERM; the pace of an upload is set by its progress callback
(a put reports each block as it is read), nothing is mocked."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter

import psutil
import pytest
from fsspec.callbacks import Callback

from conftest import make_backend
from slp_runner.artifacts import BLOB
from slp_runner.backends import seaweedfs_backend
from slp_runner.backends.s3_uploads import uploads_in_progress
from slp_runner.errors import InputError, IntegrityError
from slp_runner.hash_memo import HashMemo
from slp_runner.store import AHEAD_MIN, INCOMING, ArtifactStore
from test_faults_network import write_blob
from test_signals import start
from test_store import listing

MiB = 1024 * 1024
SIZE = 24 * MiB
assert SIZE >= AHEAD_MIN  # these puts upload ahead of their hash


def lookahead_done(timeout: float = 30.0) -> None:
    """Wait until the put's hash is known and looked up (its thread has ended)."""
    deadline = time.monotonic() + timeout
    while any(t.name == "slp-put-lookahead" and t.is_alive() for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the lookahead never ended"
        time.sleep(0.002)


class OnFirstBlock(Callback):
    """Runs ``action`` when the first bytes are reported sent (the upload waits for it);
    remembers the most bytes ever reported."""

    def __init__(self, action):
        super().__init__()
        self.action = action
        self.most = 0

    def call(self, *args, **kwargs):
        if self.value > 0 and self.action is not None:
            action, self.action = self.action, None
            action()
        self.most = max(self.most, self.value)


def incoming(store: ArtifactStore) -> list[str]:
    try:
        return store.fs.ls(store.backend.path(INCOMING), detail=False)
    except FileNotFoundError:
        return []


def answered(backend) -> Counter:
    """Requests the filer answered, by method and status (a PUT cut part-way has no answer)."""
    counts: Counter = Counter()
    backend.fs.session.hooks["response"].append(
        lambda resp, *a, **k: counts.update([f"{resp.request.method} {resp.status_code}"]))
    return counts


@pytest.fixture
def filer_store(seaweed, tmp_path):
    """A store that hashes each file in a second read beside its upload (hash_ahead)."""
    return ArtifactStore(make_backend("seaweedfs", seaweed, tmp_path), hash_ahead=True)


@pytest.fixture
def once_store(seaweed, tmp_path):
    """What a put on a filer on this machine gets by default: each file read once, as it is
    sent, and a memo of the hashes of files put before."""
    backend = make_backend("seaweedfs", seaweed, tmp_path)
    assert backend.same_machine
    return ArtifactStore(backend, hash_memo=HashMemo(str(tmp_path / "memo")))


@pytest.fixture
def big(tmp_path):
    return write_blob(tmp_path / "big.bin", SIZE)


def test_put_of_a_stored_file_stops_its_upload_and_keeps_nothing_of_it(filer_store, big):
    first = filer_store.put(big, BLOB)
    counts = answered(filer_store.backend)
    progress = OnFirstBlock(lookahead_done)

    again = filer_store.put(big, BLOB, callback=progress)

    assert not again.uploaded and again.oid == first.oid and again.seconds == 0.0
    assert progress.most <= 2 * MiB and progress.value == 0  # stopped after its first block, taken back
    # Looked up (object, manifest), the manifest refreshed, the object still there; the
    # object's PUT was cut part-way, unanswered, and its temporary name deleted all the same.
    assert counts == Counter({"GET 200": 3, "PUT 201": 1, "DELETE 204": 1}), counts
    assert incoming(filer_store) == []
    assert filer_store.verify(BLOB, first.oid).ok


def test_put_of_a_stored_file_sent_whole_before_the_lookup_keeps_nothing_of_it(filer_store, tmp_path):
    # Small enough that the upload often ends before the lookup does: then the filer
    # answers the PUT and its temporary file is deleted, not renamed.
    path = write_blob(tmp_path / "small.bin", AHEAD_MIN)
    first = filer_store.put(path, BLOB)
    for _ in range(3):
        assert not filer_store.put(path, BLOB).uploaded
    time.sleep(1)  # a filer still writing a body would make its entry by now
    assert incoming(filer_store) == []
    assert sorted(listing(filer_store.backend)) == sorted([first.object_path, filer_store.manifest_path(BLOB, first.oid)])


def test_an_upload_is_not_stopped_once_its_last_byte_is_sent(seaweed, tmp_path, big):
    # Stopped then, the connection would close on a whole body, which the filer keeps:
    # a stop is only ever asked for while bytes are left, so a stopped body is short.
    fs = make_backend("seaweedfs", seaweed, tmp_path).fs
    progress = Callback()

    def proceed():
        assert progress.value < SIZE, "asked to stop after the whole body was sent"

    path = f"t-{uuid.uuid4().hex[:12]}/whole"
    digest = fs.put_file_hashed(big, path, callback=progress, proceed=proceed)
    assert digest.size == SIZE and fs.info(path)["size"] == SIZE
    fs.rm(path.split("/")[0], recursive=True)


@pytest.mark.parametrize("name,ahead", [("seaweedfs", True), ("seaweedfs", False), ("s3", "auto")])
def test_file_changed_during_put_publishes_nothing(name, ahead, seaweed, tmp_path):
    backend = make_backend(name, seaweed, tmp_path)
    store = ArtifactStore(backend, hash_ahead=ahead)
    path = write_blob(tmp_path / "moving.bin", 40 * MiB)  # on S3 five parts: the last is read after the first is sent
    before = os.stat(path)

    def change_the_tail():
        lookahead_done()  # the file's hash is taken (the filer's thread; S3 hashed before sending)
        with open(path, "r+b") as f:
            f.seek(-MiB, os.SEEK_END)
            f.write(os.urandom(MiB))
        # Same size, same mtime: the bytes tell (a second read), or the ctime, which no call sets back.
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    with pytest.raises(IntegrityError, match="changed while it was being stored; nothing was published"):
        store.put(path, BLOB, callback=OnFirstBlock(change_the_tail))

    assert listing(backend) == []  # no object, no manifest, nothing under .incoming/
    if name == "s3":
        assert list(uploads_in_progress(backend.fs, backend.root)) == []


@pytest.mark.parametrize("name,ahead", [("seaweedfs", True), ("seaweedfs", False), ("s3", "auto")])
def test_file_cut_short_during_put_fails_at_once_and_publishes_nothing(name, ahead, seaweed, tmp_path):
    # Before: the filer waited for the bytes its Content-Length promised until its read
    # timeout (20 s), then answered "500 ... i/o timeout", which named neither the file
    # nor the cause.
    backend = make_backend(name, seaweed, tmp_path)
    store = ArtifactStore(backend, hash_ahead=ahead)
    path = write_blob(tmp_path / "shrinking.bin", 40 * MiB)

    def cut_short():
        if ahead is True:
            lookahead_done()  # the bytes are known: the cut is seen by the upload, not the hash
        os.truncate(path, 5 * MiB)

    with pytest.raises(IntegrityError, match=r"shrinking\.bin changed while it was being stored.*nothing was published"):
        store.put(path, BLOB, callback=OnFirstBlock(cut_short))
    assert listing(backend) == []
    if name == "seaweedfs":
        assert incoming(store) == []  # the cut PUT made no entry


def test_put_of_a_file_not_matching_its_expected_hash_stops_and_keeps_nothing(filer_store, big):
    with pytest.raises(InputError, match="hashes to .*, not 0{64}"):
        filer_store.put(big, BLOB, expect_oid="0" * 64, callback=OnFirstBlock(lookahead_done))
    assert listing(filer_store.backend) == []


def test_put_interrupted_mid_upload_keeps_nothing(filer_store, big):
    def interrupt():  # as the SIGINT/SIGTERM handlers do: an exception in the main thread
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        filer_store.put(big, BLOB, callback=OnFirstBlock(interrupt))
    lookahead_done()  # stopped, or finished reading: it never writes
    assert listing(filer_store.backend) == []


def test_put_whose_stored_object_is_removed_while_its_upload_stops_stores_it_again(filer_store, big):
    first = filer_store.put(big, BLOB)

    def gc_removes_it():  # after the lookup found it sound, before the put refreshed its manifest
        lookahead_done()
        filer_store.fs.rm(first.object_path)

    again = filer_store.put(big, BLOB, callback=OnFirstBlock(gc_removes_it))

    assert again.uploaded and again.oid == first.oid
    assert filer_store.verify(BLOB, first.oid).ok
    assert incoming(filer_store) == []


def test_put_over_a_damaged_object_replaces_it(filer_store, big):
    first = filer_store.put(big, BLOB, provenance={"team": "a"})
    filer_store.fs.pipe_file(first.object_path, b"truncated")

    again = filer_store.put(big, BLOB, provenance={"team": "b"})

    assert again.uploaded and again.repaired == f"stored size 9 != {SIZE} bytes"
    assert filer_store.verify(BLOB, first.oid).ok
    kept = filer_store.read_manifest(BLOB, first.oid)
    assert kept["provenance"]["team"] == "a" and kept["integrity"]["repair_reason"] == again.repaired
    assert incoming(filer_store) == []


def test_put_of_a_lost_object_stores_it_and_keeps_its_manifest(filer_store, big):
    first = filer_store.put(big, BLOB, provenance={"team": "a"})
    filer_store.fs.rm(first.object_path)

    again = filer_store.put(big, BLOB, provenance={"team": "b"})

    assert again.uploaded and again.repaired == "the object was missing, its manifest was not"
    assert filer_store.verify(BLOB, first.oid).ok
    assert filer_store.read_manifest(BLOB, first.oid)["provenance"]["team"] == "a"


def test_put_of_a_stored_object_with_a_damaged_manifest_rewrites_only_the_manifest(filer_store, big):
    first = filer_store.put(big, BLOB)
    filer_store.fs.pipe_file(filer_store.manifest_path(BLOB, first.oid), b"{not json")

    again = filer_store.put(big, BLOB, callback=OnFirstBlock(lookahead_done))

    assert not again.uploaded and again.manifest_rewritten
    assert filer_store.verify(BLOB, first.oid).ok
    assert incoming(filer_store) == []


def test_sigterm_during_a_filer_put_leaves_nothing(seaweed, tmp_path):
    path = write_blob(tmp_path / "big.bin", 256 * MiB)
    root = f"t-{uuid.uuid4().hex[:12]}"
    env = dict(os.environ, SLP_CACHE_DIR=str(tmp_path / "cache"), SLP_SERVER="off")
    proc = start(env, "task=put", "kind=blob", f"path={path}", "progress=false", "backend=seaweedfs",
                 f"backend.filer_url={seaweed.filer_url}", f"backend.root={root}")
    reading = psutil.Process(proc.pid)
    start_chars = None
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:  # the upload reads the file; hashing maps it
        chars = reading.io_counters().read_chars
        start_chars = chars if start_chars is None else start_chars
        if os.path.exists(path) and chars - start_chars >= 64 * MiB:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "finished before it was stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "slp: interrupted (SIGTERM)"
    fs = seaweedfs_backend(filer_url=seaweed.filer_url, root=root).fs
    left = fs.find(root) if fs.exists(root) else []
    assert left == [], left


# -- a filer on this machine: the file read once, as it is sent ---------------------


def test_a_filer_on_this_machine_gets_its_files_read_once(once_store, big):
    seen = []
    put = once_store.put(big, BLOB, callback=OnFirstBlock(
        lambda: seen.append([t.name for t in threading.enumerate() if t.name == "slp-put-lookahead"])))
    assert seen == [[]]  # no second read beside the upload
    assert put.uploaded and put.hash_seconds == 0.0 and put.verification == "inline-hash"
    assert once_store.verify(BLOB, put.oid).ok
    assert incoming(once_store) == []


def test_which_filers_are_on_this_machine():
    for url in ("http://127.0.0.1:8888", "http://localhost:8888", "http://[::1]:8888", "http://127.3.2.1"):
        assert seaweedfs_backend(filer_url=url).same_machine, url
    for url in ("http://10.0.0.2:8888", "http://filer.example:8888", "http://192.168.1.5"):
        assert not seaweedfs_backend(filer_url=url).same_machine, url


def test_a_file_stored_already_but_never_hashed_here_is_sent_then_dropped(once_store, big, tmp_path):
    first = once_store.put(big, BLOB)
    copy = tmp_path / "copy.bin"  # same bytes, another inode: nothing remembered for it
    copy.write_bytes(open(big, "rb").read())

    again = once_store.put(str(copy), BLOB)

    assert not again.uploaded and again.sent_anyway and again.oid == first.oid
    assert incoming(once_store) == []
    assert sorted(listing(once_store.backend)) == sorted([first.object_path, once_store.manifest_path(BLOB, first.oid)])


def test_a_file_put_before_is_looked_up_by_its_remembered_hash_and_not_sent_again(once_store, big):
    first = once_store.put(big, BLOB)
    progress = OnFirstBlock(lookahead_done)

    again = once_store.put(big, BLOB, callback=progress)

    assert not again.uploaded and not again.sent_anyway and again.oid == first.oid
    assert progress.most <= 2 * MiB and progress.value == 0  # stopped after its first block, taken back
    assert again.hash_seconds > 0  # the file was hashed before it was taken for the stored object
    assert incoming(once_store) == []


def _memo_record(memo_root, path) -> str:
    [record] = [os.path.join(memo_root, n) for n in os.listdir(memo_root) if n.endswith(".json")
                and n.startswith(f"{os.stat(path).st_dev:x}-{os.stat(path).st_ino:x}.")]
    return record


def test_a_remembered_hash_that_lies_never_decides_what_is_stored(seaweed, tmp_path, big):
    backend = make_backend("seaweedfs", seaweed, tmp_path)
    memo_root = tmp_path / "memo"
    store = ArtifactStore(backend, hash_memo=HashMemo(str(memo_root)))
    other = store.put(write_blob(tmp_path / "other.bin", SIZE), BLOB)  # stored, and sound
    first = store.put(big, BLOB)
    store.fs.rm([first.object_path, store.manifest_path(BLOB, first.oid)])
    record = _memo_record(memo_root, big)
    with open(record) as f:
        lie = json.load(f)
    lie["blake3"] = other.oid  # as a stale or edited record would say
    with open(record, "w") as f:
        json.dump(lie, f)

    again = store.put(big, BLOB, callback=OnFirstBlock(lookahead_done))

    # The lie found a sound object and stopped the upload; the file's own hash did not
    # match it, so the file was sent again and stored under its own hash.
    assert again.uploaded and again.oid == first.oid
    assert store.verify(BLOB, first.oid).ok and store.verify(BLOB, other.oid).ok
    assert store.read_manifest(BLOB, other.oid)["blake3"] == other.oid
    assert HashMemo(str(memo_root)).recall(os.stat(big)) == first.oid  # put right
    assert incoming(store) == []


def test_a_memo_that_cannot_be_read_or_written_is_no_error(seaweed, tmp_path, big):
    backend = make_backend("seaweedfs", seaweed, tmp_path)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the memo's folder would be")
    put = ArtifactStore(backend, hash_memo=HashMemo(str(blocked))).put(big, BLOB)
    assert put.uploaded

    memo_root = tmp_path / "memo"
    store = ArtifactStore(backend, hash_memo=HashMemo(str(memo_root)))
    assert not store.put(big, BLOB).uploaded
    with open(_memo_record(memo_root, big), "w") as f:
        f.write("{not json")
    again = store.put(big, BLOB)
    assert not again.uploaded and again.sent_anyway and again.oid == put.oid  # found after the upload


def test_the_memo_keeps_its_newest_records_and_sweeps_killed_writes(tmp_path, monkeypatch):
    import slp_runner.hash_memo as hash_memo

    monkeypatch.setattr(hash_memo, "KEEP", 3)
    memo = HashMemo(str(tmp_path / "memo"))
    files = []
    for i in range(6):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(b"x" * i)
    for i in range(5):
        memo.remember(os.stat(files[i]), f"{i:064x}")
        os.utime(_memo_record(tmp_path / "memo", files[i]), (1000 + i, 1000 + i))
    assert [memo.recall(os.stat(f)) is not None for f in files] == [False, False, True, True, True, False]
    killed = tmp_path / "memo" / ".memo-killed.part"  # what a put killed mid-write left
    first = tmp_path / "memo" / f"{os.path.basename(_memo_record(tmp_path / 'memo', files[4]))}.123-456.tmp"
    for leftover in (killed, first):  # the first version named its temporary files so
        leftover.write_text('{"vers')
        os.utime(leftover, (time.time() - 7200,) * 2)

    memo.remember(os.stat(files[2]), f"{2:064x}")  # put again: now the newest
    memo.remember(os.stat(files[5]), f"{5:064x}")
    assert [memo.recall(os.stat(f)) for f in files] == [None, None, f"{2:064x}", None, f"{4:064x}", f"{5:064x}"]
    assert not killed.exists() and not first.exists()
    assert len(os.listdir(tmp_path / "memo")) == 3


def test_a_file_not_matching_its_expected_hash_is_refused_after_one_read(once_store, big):
    with pytest.raises(InputError, match="hashes to .*, not 0{64}"):
        once_store.put(big, BLOB, expect_oid="0" * 64)
    assert listing(once_store.backend) == []


@pytest.mark.parametrize("ahead", [True, "auto"])
def test_a_filer_put_records_the_sha256_asked_for(seaweed, tmp_path, big, ahead):
    store = ArtifactStore(make_backend("seaweedfs", seaweed, tmp_path), hash_ahead=ahead)
    put = store.put(big, BLOB, sha256=True)
    with open(big, "rb") as f:
        expected = hashlib.sha256(f.read()).hexdigest()
    assert put.sha256 == expected and store.read_manifest(BLOB, put.oid)["sha256"] == expected
