"""One conformance suite for the store, run over local, SeaweedFS filer and S3 gateway."""

import os
import threading

import blake3
import pytest

from slp_runner import commands
from slp_runner.artifacts import BLOB, KINDS, MODEL, PROMPTS, RESULTS
from slp_runner.errors import ArtifactNotFound, BadJSONL, InputError, IntegrityError, InvalidHash, NotGGUF
from slp_runner.store import INCOMING, ArtifactStore


def listing(backend):
    """Every file under the backend root (to prove nothing was left behind)."""
    if not backend.fs.exists(backend.root):
        return []
    found = backend.fs.find(backend.root, detail=True)
    # weed s3 may show an emptied folder as a zero-byte marker named like the folder
    return sorted(p for p, info in found.items() if info["type"] == "file" and p.rstrip("/") != backend.root)


def test_put_then_get_roundtrip(store, cache, small_file):
    result = store.put(str(small_file), BLOB, name="blob")
    assert result.uploaded
    assert result.oid == blake3.blake3(small_file.read_bytes()).hexdigest()
    assert store.exists(BLOB, result.oid)
    got = cache.get(store, BLOB, result.oid)
    assert not got.cache_hit
    assert open(got.path, "rb").read() == small_file.read_bytes()
    assert listing(store.backend) == sorted(
        [store.object_path(BLOB, result.oid), store.manifest_path(BLOB, result.oid)]
    )


def test_layout_and_manifest(store, prompts_file):
    result = store.put(str(prompts_file), PROMPTS, provenance={"team": "serving"})
    assert result.object_path.endswith(f"prompts/{result.oid}.jsonl")
    m = store.read_manifest(PROMPTS, result.oid)
    assert m["artifact_type"] == "prompts"
    assert m["blake3"] == result.oid
    assert m["size_bytes"] == prompts_file.stat().st_size
    assert m["file_name"] == "prompts.jsonl"
    assert m["metadata"]["record_count"] == 2
    assert m["provenance"]["team"] == "serving"
    assert m["provenance"]["uploader_host"]
    assert m["integrity"]["algorithm"] == "BLAKE3" and m["integrity"]["verified"] is True
    expected = "inline-hash" if store.backend.verified_upload is not None else "size"
    assert m["integrity"]["verification_method"] == expected


def test_second_put_is_deduplicated(store, small_file, tmp_path):
    first = store.put(str(small_file), BLOB)
    copy = tmp_path / "copy.bin"
    copy.write_bytes(small_file.read_bytes())
    second = store.put(str(copy), BLOB)
    assert first.uploaded and not second.uploaded
    assert second.oid == first.oid
    assert second.manifest["file_name"] == "blob.bin"  # the original manifest is kept


def test_missing_manifest_is_rewritten_on_dedup(store, small_file):
    first = store.put(str(small_file), BLOB)
    store.fs.rm(store.manifest_path(BLOB, first.oid))
    again = store.put(str(small_file), BLOB)
    assert not again.uploaded
    assert store.read_manifest(BLOB, first.oid)["blake3"] == first.oid


def test_rehash_verification_mode(backend, small_file):
    store = ArtifactStore(backend, verify_upload="rehash")
    result = store.put(str(small_file), BLOB)
    assert result.verification == "rehash"
    assert store.read_manifest(BLOB, result.oid)["integrity"]["verification_method"] == "rehash"


def test_sha256_in_same_pass(store, small_file):
    import hashlib

    result = store.put(str(small_file), BLOB, sha256=True)
    assert store.read_manifest(BLOB, result.oid)["sha256"] == hashlib.sha256(small_file.read_bytes()).hexdigest()


def test_verify_and_get_catch_corruption_in_backend(store, cache, small_file):
    result = store.put(str(small_file), BLOB)
    assert store.verify(BLOB, result.oid).ok
    corrupted = bytearray(small_file.read_bytes())
    corrupted[1000] ^= 0xFF
    store.fs.pipe_file(store.object_path(BLOB, result.oid), bytes(corrupted))
    check = store.verify(BLOB, result.oid)
    assert not check.ok and check.detail.startswith("corrupt")
    with pytest.raises(IntegrityError, match=result.oid):
        cache.get(store, BLOB, result.oid)
    assert not os.path.exists(cache.path_for(BLOB, result.oid))
    assert [f for f in os.listdir(os.path.dirname(cache.path_for(BLOB, result.oid))) if f.endswith(".part")] == []


def test_get_unknown_hash(store, cache):
    oid = "0" * 64
    with pytest.raises(ArtifactNotFound, match=oid):
        cache.get(store, MODEL, oid)
    with pytest.raises(ArtifactNotFound, match=oid):
        store.find_kind(oid)
    assert not os.path.exists(cache.path_for(MODEL, oid))


def test_find_kind_and_list(store, prompts_file, small_file):
    p = store.put(str(prompts_file), PROMPTS)
    b = store.put(str(small_file), RESULTS)
    assert store.find_kind(p.oid) is PROMPTS
    assert store.find_kind(b.oid) is RESULTS
    assert [o["oid"] for o in store.list(PROMPTS)] == [p.oid]


def test_find_kind_prefers_an_object_and_falls_back_to_a_lost_objects_manifest(store, tmp_path):
    # The probes go out at once on a remote backend: the answer is still the first kind
    # that holds the object, else the first whose manifest says it (an object to repair).
    data = os.urandom(5000)
    (tmp_path / "x.bin").write_bytes(data)
    as_results = store.put(str(tmp_path / "x.bin"), RESULTS)
    as_blob = store.put(str(tmp_path / "x.bin"), BLOB)
    assert as_results.oid == as_blob.oid
    first, second = RESULTS, BLOB  # in the order of KINDS
    assert list(KINDS.values()).index(first) < list(KINDS.values()).index(second)
    assert store.find_kind(as_blob.oid) is first
    store.fs.rm(store.object_path(first, as_blob.oid))
    assert store.find_kind(as_blob.oid) is second  # an object beats another kind's manifest
    store.fs.rm(store.object_path(second, as_blob.oid))
    assert store.find_kind(as_blob.oid) is first  # no object: the first manifest


@pytest.mark.parametrize("bad", ["../" + "a" * 61, "A" * 64, "abc"])
def test_malformed_hash_rejected_before_any_io(store, cache, bad):
    with pytest.raises(InvalidHash):
        cache.get(store, MODEL, bad)
    with pytest.raises(InvalidHash):
        store.exists(MODEL, bad)


def test_bad_inputs_leave_nothing_behind(store, tmp_path):
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"this is not a model" * 100)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(NotGGUF, match="fake.gguf"):
        store.put(str(not_gguf), MODEL)
    with pytest.raises(BadJSONL, match=r"broken\.jsonl:2"):
        store.put(str(broken), PROMPTS)
    with pytest.raises(InputError, match="no such file"):
        store.put(str(tmp_path / "missing.gguf"), MODEL)
    assert listing(store.backend) == []


def test_file_changing_during_upload_is_not_published(store, tmp_path):
    from fsspec.callbacks import Callback

    path = tmp_path / "moving.bin"
    path.write_bytes(os.urandom(20 * 1024 * 1024))  # several S3 parts (up to 16 MiB: one PUT, checked before it is sent)

    def append_to_source():  # another writer changes the file mid-upload
        with open(path, "ab") as f:
            f.write(b"late bytes")

    fired = []

    class ChangeOnFirstProgress(Callback):  # streamed uploads report progress part by part
        def call(self, *args, **kwargs):
            if not fired:
                fired.append(True)
                append_to_source()

    original_put_file = store.fs.put_file

    def put_file_then_change(lpath, rpath, **kw):  # whole-file copies report no progress
        original_put_file(lpath, rpath, **kw)
        append_to_source()

    store.fs.put_file = put_file_then_change
    try:
        with pytest.raises(IntegrityError, match="changed while"):
            store.put(str(path), BLOB, callback=ChangeOnFirstProgress())
    finally:
        del store.fs.put_file
    assert listing(store.backend) == []


def test_concurrent_puts_of_one_file(store, small_file):
    results, errors = [], []

    def worker():
        try:
            results.append(store.put(str(small_file), BLOB))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.oid for r in results}) == 1
    assert store.verify(BLOB, results[0].oid).ok
    assert [p for p in listing(store.backend) if INCOMING in p] == []


def test_real_gemma_put_get(store, cache, gemma_path, tmp_path):
    result = store.put(gemma_path, MODEL, name="gemma3-270m")
    meta = store.read_manifest(MODEL, result.oid)["metadata"]
    assert meta["architecture"] == "gemma3" and meta["quantization"] == "Q4_K_M"
    assert meta["context_length"] == 32768
    dest = tmp_path / "model.gguf"
    got = commands.get(store, cache, None, result.oid, dest=str(dest), progress=False, out=open(os.devnull, "w"))
    assert got.size == os.path.getsize(gemma_path)
    assert blake3.blake3(dest.read_bytes()).hexdigest() == result.oid
