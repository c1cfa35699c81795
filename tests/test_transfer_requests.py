"""How few requests a put and a get make on the real filer and S3 gateway, and what
weed's S3 gateway promises about conditional writes. Counted on the wire: a requests
response hook on the filer's session, a botocore event on the S3 client."""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections import Counter

import blake3
import pytest
from botocore.exceptions import ClientError
from fsspec.callbacks import Callback

from conftest import make_backend
from slp_runner.artifacts import BLOB
from slp_runner.backends import FILER_BUFFERED_PUT_MAX
from slp_runner.backends.s3_multipart import download_ordered, parts_client
from slp_runner.backends.seaweedfs import upload_verified
from slp_runner.cache import LocalCache
from slp_runner.errors import IntegrityError
from slp_runner.hash_memo import HashMemo
from slp_runner.store import AHEAD_MIN, INCOMING, ArtifactStore

MiB = 1024 * 1024


def counting(backend) -> Counter:
    counts: Counter = Counter()
    if backend.name == "seaweedfs":
        backend.fs.session.hooks["response"].append(
            lambda resp, *a, **k: counts.update([f"{resp.request.method} {resp.status_code}"]))
    else:
        backend.fs.connect()
        # s3fs's client, and the one that sends upload parts
        for client in (backend.fs.s3, parts_client(backend.fs, 4)):
            client.meta.events.register(
                "before-send.s3", lambda event_name, **k: counts.update([event_name.rsplit(".", 1)[-1]]))
    return counts


@pytest.fixture
def blob(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(12 * MiB + 5))  # the filer sends it while hashing it; one PUT on S3
    return path


@pytest.fixture
def large_blob(tmp_path):
    path = tmp_path / "large.bin"
    path.write_bytes(os.urandom(20 * MiB + 5))  # past BUFFERED_PUT_MAX: three S3 parts, the last short
    return path


class _FirstBlockWaits(Callback):
    """Holds a put's upload after its first block until the put's hash is looked up
    (its lookahead thread has ended): then it is stopped, not sent whole, every time."""

    def call(self, *args, **kwargs):
        while self.value and any(t.name == "slp-put-lookahead" and t.is_alive() for t in threading.enumerate()):
            time.sleep(0.002)


def test_filer_put_and_get_requests(seaweed, tmp_path, blob, cache):
    backend = make_backend("seaweedfs", seaweed, tmp_path)
    assert backend.same_machine  # so the file is read once, as it is sent
    store = ArtifactStore(backend, hash_memo=HashMemo(str(tmp_path / "memo")))
    counts = counting(backend)

    new = store.put(str(blob), BLOB)
    # The object PUT under .incoming/ at once, hashed as it streams; then its hash looked
    # up (object and manifest: 404), the object renamed, the manifest PUT in place.
    assert new.verification == "inline-hash" and new.hash_seconds == 0.0
    assert counts == Counter({"GET 404": 2, "PUT 201": 2, "POST 204": 1}), counts
    counts.clear()
    again = store.put(str(blob), BLOB, callback=_FirstBlockWaits())
    assert not again.uploaded and not again.sent_anyway
    # The hash remembered for the file is looked up at once and found sound (object,
    # manifest): the object's PUT is cut after its first block (no answer), its temporary
    # name deleted, the file hashed; the manifest refreshed, the object still there.
    assert counts == Counter({"GET 200": 3, "PUT 201": 1, "DELETE 204": 1}), counts
    counts.clear()
    copy = tmp_path / "copy.bin"  # the same bytes, never hashed on this machine
    shutil.copyfile(blob, copy)
    dropped = store.put(str(copy), BLOB)
    assert not dropped.uploaded and dropped.sent_anyway and dropped.oid == new.oid
    # Sent whole and answered, found stored under the sent bytes' hash, deleted.
    assert counts == Counter({"GET 200": 3, "PUT 201": 2, "DELETE 204": 1}), counts
    counts.clear()
    cache.get(store, BLOB, new.oid)
    assert counts == Counter({"GET 200": 1}), counts  # one streamed GET, whose answer says the size
    assert backend.fs.ls(backend.path(INCOMING), detail=False) == []


@pytest.mark.parametrize("name", ["seaweedfs", "s3"])
def test_a_get_that_waited_for_another_gets_lock_reads_afresh(seaweed, tmp_path, blob, name):
    # A get opens its download before it takes the entry's lock (the answer says the
    # size). Another get holding the lock, for as long as a large download takes, would
    # leave that answer stale: it is dropped, and the bytes are asked for again.
    from filelock import FileLock

    backend = make_backend(name, seaweed, tmp_path)
    store = ArtifactStore(backend)
    oid = store.put(str(blob), BLOB).oid
    cache = LocalCache(str(tmp_path / "cache"))
    counts = counting(backend)
    lock = FileLock(cache.path_for(BLOB, oid) + ".lock")
    os.makedirs(os.path.dirname(lock.lock_file), exist_ok=True)
    got = []
    with lock:
        waiting = threading.Thread(target=lambda: got.append(cache.get(store, BLOB, oid)))
        waiting.start()
        deadline = time.monotonic() + 10
        while sum(counts.values()) < 1 and time.monotonic() < deadline:  # it has opened its read
            time.sleep(0.01)
        time.sleep(0.2)
        assert waiting.is_alive() and not got  # held by the lock
    waiting.join(30)
    assert got and got[0].validation == "download"
    assert blake3.blake3(open(got[0].path, "rb").read()).hexdigest() == oid
    if name == "seaweedfs":
        assert counts == Counter({"GET 200": 2}), counts  # the first answer dropped, a second GET read
    else:
        assert counts == Counter({"GetObject": 3}), counts  # the first part's answer dropped; two parts read


def test_filer_put_of_a_small_file_hashes_first(seaweed, tmp_path):
    backend = make_backend("seaweedfs", seaweed, tmp_path)
    store = ArtifactStore(backend)
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(AHEAD_MIN - 1))
    counts = counting(backend)

    assert store.put(str(small), BLOB).uploaded
    assert counts == Counter({"GET 404": 2, "PUT 201": 2, "POST 204": 1}), counts
    counts.clear()
    assert not store.put(str(small), BLOB).uploaded
    assert counts == Counter({"GET 200": 3, "PUT 201": 1}), counts  # nothing of the object sent


def test_filer_put_of_a_file_read_whole(seaweed, tmp_path):
    backend = make_backend("seaweedfs", seaweed, tmp_path)
    store = ArtifactStore(backend)
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(FILER_BUFFERED_PUT_MAX))
    counts = counting(backend)

    put = store.put(str(small), BLOB)
    # Read and hashed in memory, looked up (404s), that buffer PUT under its hash (no
    # temporary name, no rename), the manifest PUT.
    assert put.uploaded and put.verification == "inline-hash"
    assert counts == Counter({"GET 404": 2, "PUT 201": 2}), counts
    assert backend.fs.cat_file(put.object_path) == small.read_bytes()
    counts.clear()
    assert not store.put(str(small), BLOB).uploaded
    assert counts == Counter({"GET 200": 3, "PUT 201": 1}), counts


def test_s3_put_and_get_requests(seaweed, tmp_path, blob, large_blob, cache):
    backend = make_backend("s3", seaweed, tmp_path)
    store = ArtifactStore(backend)
    backend.ensure_writable()
    counts = counting(backend)

    new = store.put(str(blob), BLOB)
    # Looked up (object: one HEAD; manifest: GET), one PUT of the object from the buffer
    # that was hashed, the manifest PUT.
    assert new.verification == "inline-hash"
    assert counts == Counter({"HeadObject": 1, "GetObject": 1, "PutObject": 2}), counts
    counts.clear()
    large = store.put(str(large_blob), BLOB)
    assert counts == Counter({"HeadObject": 1, "GetObject": 1, "CreateMultipartUpload": 1,
                              "UploadPart": 3, "CompleteMultipartUpload": 1, "PutObject": 1}), counts
    counts.clear()
    assert not store.put(str(large_blob), BLOB).uploaded
    assert counts == Counter({"HeadObject": 2, "GetObject": 1, "PutObject": 1}), counts
    counts.clear()
    cache.get(store, BLOB, new.oid)
    # no HEAD: the first ranged GET's answer says the size, before anything is made locally
    assert counts == Counter({"GetObject": 2}), counts
    assert store.verify(BLOB, large.oid).ok


def test_s3_download_from_any_offset_without_a_head(seaweed, tmp_path):
    backend = make_backend("s3", seaweed, tmp_path)
    backend.ensure_writable()
    data = os.urandom(3 * MiB + 7)
    path = backend.path("blob")
    backend.fs.pipe_file(path, data)
    backend.fs.pipe_file(backend.path("empty"), b"")
    for offset in (0, 1, MiB, len(data) - 1, len(data)):
        got = []
        size = download_ordered(backend.fs, path, got.append, offset=offset, part_size=MiB, concurrency=2)
        assert b"".join(got) == data[offset:] and size == len(data)
    got = []
    assert download_ordered(backend.fs, backend.path("empty"), got.append, part_size=MiB) == 0 and got == []
    with pytest.raises(FileNotFoundError):
        download_ordered(backend.fs, backend.path("missing"), got.append)


def test_filer_verified_upload_hashes_what_it_sends_and_publishes_only_if_checked(seaweed, tmp_path, blob):
    fs = make_backend("seaweedfs", seaweed, tmp_path).fs
    base = f"t-{uuid.uuid4().hex[:12]}"
    seen = []
    upload_verified(fs, str(blob), f"{base}/good", seen.append, incoming=f"{base}/{INCOMING}/good.part")
    assert seen[0].blake3 == blake3.blake3(blob.read_bytes()).hexdigest() and seen[0].size == blob.stat().st_size
    assert fs.cat_file(f"{base}/good") == blob.read_bytes()

    def refuse(digest):
        raise IntegrityError("not the bytes we meant")

    with pytest.raises(IntegrityError):
        upload_verified(fs, str(blob), f"{base}/bad", refuse, incoming=f"{base}/{INCOMING}/bad.part")
    assert not fs.exists(f"{base}/bad")
    assert fs.ls(f"{base}/{INCOMING}", detail=False) == []
    fs.rm(base, recursive=True)


def test_weed_s3_honours_if_none_match(seaweed, tmp_path):
    """A second conditional PUT (``If-None-Match: *``) of an existing key gets 412 and
    leaves the first bytes, for a single PUT and a multipart completion alike."""
    backend = make_backend("s3", seaweed, tmp_path)
    backend.ensure_writable()
    bucket, _, prefix = backend.root.partition("/")
    key = f"{prefix}/once"
    fs = backend.fs
    fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"first", IfNoneMatch="*")

    with pytest.raises(OSError) as err:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"second", IfNoneMatch="*")
    assert isinstance(err.value.__cause__, ClientError)
    assert err.value.__cause__.response["ResponseMetadata"]["HTTPStatusCode"] == 412

    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    etag = fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"third")["ETag"]
    with pytest.raises(OSError) as err:
        fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload, IfNoneMatch="*",
                   MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    assert err.value.__cause__.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
    assert fs.cat_file(f"{bucket}/{key}") == b"first"


@pytest.mark.parametrize("name", ["seaweedfs", "s3"])
def test_get_by_hash_alone_asks_each_kind_once_and_sizes_from_that(seaweed, tmp_path, name):
    # slp task=get hash=<h>: every kind's folder probed at once (the object's answer gives
    # its size), then the download; no second request for the size.
    backend = make_backend(name, seaweed, tmp_path)
    put = ArtifactStore(backend).put(str(write(tmp_path / "b.bin", 3 * MiB)), BLOB)
    store = ArtifactStore(backend)  # a new command's
    counts = counting(backend)
    kind = store.find_kind(put.oid)
    LocalCache(str(tmp_path / "cache")).get(store, kind, put.oid)
    if name == "seaweedfs":
        assert counts == Counter({"GET 404": 3, "GET 200": 2}), counts  # 4 probes, then the object
    else:  # 4 HEADs, then one ranged GET (the whole 3 MiB; it says the size too)
        assert counts == Counter({"HeadObject": 4, "GetObject": 1}), counts


def write(path, size: int):
    path.write_bytes(os.urandom(size))
    return path
