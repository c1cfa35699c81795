"""Store garbage collection (slp_runner.gc), on the real backends: runs made by the
real runner, names written by refs, objects put by the store."""

from __future__ import annotations

import io
import os
import shutil
import time
from datetime import timedelta

import orjson
import pytest

from slp_runner import refs
from slp_runner.artifacts import BLOB, KINDS, PROMPTS
from slp_runner.backends import seaweedfs_backend
from slp_runner.cache import LocalCache
from slp_runner.errors import ArtifactNotFound, BackendError, ConfigError, IntegrityError
from slp_runner.gc import collect_garbage
from slp_runner.pipeline.history import _id_time
from slp_runner.pipeline.run import execute
from slp_runner.pipeline.spec import build_pipeline
from slp_runner.store import ArtifactStore


def blob_file(tmp_path, name: str, size: int):
    path = tmp_path / "files" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(name.encode() + os.urandom(size))
    return path


def put(store, tmp_path, name: str, size: int = 1000, kind=BLOB):
    if kind is PROMPTS:
        path = tmp_path / "files" / f"{name}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text(orjson.dumps({"id": name, "prompt": os.urandom(size // 2).hex()}).decode() + "\n")
        return store.put(str(path), kind)
    return store.put(str(blob_file(tmp_path, name, size)), kind)


def run_putting(store, tmp_path, *paths, fetch: bool = False):
    """A real run whose stages put ``paths`` as blobs (and, with ``fetch``, get each back)."""
    stages = {}
    for i, path in enumerate(paths):
        stages[f"put{i}"] = {"_target_": "slp_runner.stages.builtin.put_artifact",
                             "params": {"path": str(path), "kind": "blob"}}
        if fetch:
            stages[f"fetch{i}"] = {"_target_": "slp_runner.stages.builtin.fetch",
                                   "inputs": {"hash": f"@put{i}.artifact"}}
    return execute(build_pipeline("put_blobs", stages), store, LocalCache(str(tmp_path / "cache")),
                   config_yaml="{}", overrides=[], runs_dir=str(tmp_path / "runs"), out=io.StringIO())


def gc(store, tmp_path, **kw):
    out = io.StringIO()
    report = collect_garbage(store, runs_dir=str(tmp_path / "runs"), out=out, **kw)
    report["text"] = out.getvalue()
    return report


def snapshot(store) -> dict[str, bytes]:
    """Every object and manifest of every kind folder, by path."""
    found = {}
    for kind in KINDS.values():
        folder = store.backend.path(kind.folder)
        store.fs.invalidate_cache()
        if store.fs.exists(folder):
            for e in store.fs.ls(folder, detail=True):
                if e.get("type") == "file" and not e["name"].endswith("/"):  # not S3's empty-folder marker
                    found[e["name"]] = store.fs.cat_file(e["name"])
    return found


def remove_run(store, tmp_path, run_id: str, local: bool = True, backend: bool = True) -> None:
    if local:
        shutil.rmtree(tmp_path / "runs" / run_id)
    if backend:
        store.fs.rm(store.backend.path("runs", run_id), recursive=True)
        store.fs.invalidate_cache()


def test_gc_sweeps_exactly_the_unreferenced_objects(store, tmp_path):
    named = put(store, tmp_path, "named", 3000)
    in_run = [blob_file(tmp_path, n, 2000) for n in ("run-a", "run-b")]
    result = run_putting(store, tmp_path, *in_run)
    by_run = {a["hash"] for a in result.manifest["artifacts"].values()}
    refs.write_ref(store, "keepme", "v1", BLOB, named.oid, named.size)
    kept = put(store, tmp_path, "kept", 4000)
    junk = [put(store, tmp_path, "junk-1", 5000), put(store, tmp_path, "junk-2", 6000),
            put(store, tmp_path, "junk-3", 700, PROMPTS)]
    junk_oids = {p.oid for p in junk}
    manifest_bytes = sum(len(store.fs.cat_file(store.manifest_path(p.kind, p.oid))) for p in junk)
    before = snapshot(store)

    dry = gc(store, tmp_path, keep=[kept.oid[:10]], grace=0)  # keep= takes a prefix (or a name, or a hash)

    assert dry["dry_run"] and dry["roots"] == {"runs": 1, "names": 1, "kept": 1}
    assert dry["runs_kept"] == [result.run_id]
    assert {s["hash"] for s in dry["swept"]} == junk_oids
    assert {(s["kind"], s["size"]) for s in dry["swept"]} == {(p.kind.name, p.size) for p in junk}
    assert dry["freed_bytes"] == sum(p.size for p in junk) + manifest_bytes
    assert dry["marked"] == 4 and dry["young"] == 0 and dry["stage_cache_dropped"] == 0
    assert snapshot(store) == before  # a dry run deletes nothing
    assert "3 unreferenced objects" in dry["text"] and "(dry run: apply=true deletes them)" in dry["text"]
    assert dry["text"].count("would delete") == 3

    done = gc(store, tmp_path, keep=[kept.oid[:10]], grace=0, apply=True)

    assert {s["hash"] for s in done["swept"]} == junk_oids and done["freed_bytes"] == dry["freed_bytes"]
    after = snapshot(store)
    gone = {p for p in before if any(o in p for o in junk_oids)}
    assert len(gone) == 6 and set(after) == set(before) - gone  # objects and manifests, nothing else
    assert all(after[p] == before[p] for p in after)  # the rest byte-identical
    for oid in by_run | {named.oid, kept.oid}:
        assert store.verify(BLOB, oid).ok
    assert "3 unreferenced objects deleted" in done["text"]
    again = gc(store, tmp_path, keep=[kept.oid[:10]], grace=0, apply=True)
    assert again["swept"] == [] and again["marked"] == 4


def test_keep_runs_and_keep_since(store, tmp_path):
    first = run_putting(store, tmp_path, blob_file(tmp_path, "first", 100))
    time.sleep(1.1)  # run ids (and keep_since) count whole seconds
    second = run_putting(store, tmp_path, blob_file(tmp_path, "second", 100))
    a = next(iter(first.manifest["artifacts"].values()))["hash"]
    b = next(iter(second.manifest["artifacts"].values()))["hash"]

    def swept(**kw):
        return {s["hash"] for s in gc(store, tmp_path, grace=0, **kw)["swept"]}

    assert swept() == set()
    assert swept(keep_runs=1) == {a}
    assert swept(keep_runs=0) == {a, b}
    second_started = _id_time(second.run_id)
    assert swept(keep_since=second_started.replace(tzinfo=None).isoformat()) == {a}
    assert swept(keep_since="1h") == set()
    assert swept(keep_since=(second_started + timedelta(days=1)).date().isoformat()) == {a, b}
    # both: the runs either keeps
    assert swept(keep_runs=1, keep_since=_id_time(first.run_id).isoformat()) == set()
    report = gc(store, tmp_path, grace=0, keep_runs=1, apply=True)
    assert report["runs_kept"] == [second.run_id]
    assert not store.exists(BLOB, a) and store.verify(BLOB, b).ok


def test_grace_keeps_young_unreferenced_objects(store, tmp_path):
    fresh = put(store, tmp_path, "fresh")
    report = gc(store, tmp_path, apply=True)  # default grace: 24 h
    assert report["swept"] == [] and report["young"] == 1
    assert "1 younger than 24h kept" in report["text"]
    assert store.verify(BLOB, fresh.oid).ok


def test_object_refreshed_after_the_listing_is_kept(store, tmp_path):
    """A put that deduplicates against an old object between gc's listing and its
    delete refreshes the manifest: the re-check just before the delete sees it."""
    old = put(store, tmp_path, "old")
    time.sleep(3.1)  # older than grace=2 s; a refresh younger, even where the backend keeps whole seconds
    folder = store.backend.path(BLOB.folder)
    listing = store.fs.ls

    def ls_then_refresh(path, *args, **kwargs):
        found = listing(path, *args, **kwargs)
        if path == folder:  # what a concurrent dedup put does to the manifest, right after gc listed
            store.put_bytes(store.fs.cat_file(store.manifest_path(BLOB, old.oid)), BLOB.manifest_name(old.oid))
        return found

    store.fs.ls = ls_then_refresh
    try:
        report = gc(store, tmp_path, grace=2, apply=True)
    finally:
        del store.fs.ls
    assert report["swept"] == [] and report["refreshed"] == 1
    assert store.verify(BLOB, old.oid).ok


def test_dedup_put_racing_the_gc_keeps_its_object(store, tmp_path):
    path = blob_file(tmp_path, "raced", 100)
    old = store.put(str(path), BLOB)
    time.sleep(3.1)
    folder = store.backend.path(BLOB.folder)
    listing = store.fs.ls
    puts = []

    def ls_then_put(where, *args, **kwargs):
        found = listing(where, *args, **kwargs)
        if where == folder:  # another process puts the same bytes right after gc listed them
            puts.append(store.put(str(path), BLOB))
        return found

    store.fs.ls = ls_then_put
    try:
        report = gc(store, tmp_path, grace=2, apply=True)
    finally:
        del store.fs.ls
    assert not puts[0].uploaded  # deduplicated against the old object
    assert report["swept"] == [] and store.verify(BLOB, old.oid).ok


def test_stage_cache_hit_racing_the_gc_keeps_its_object(store, tmp_path):
    path = blob_file(tmp_path, "hit", 100)
    first = run_putting(store, tmp_path, path)
    oid = first.records["put0"].outputs["artifact"].oid
    remove_run(store, tmp_path, first.run_id)  # only the stage cache refers to it now
    time.sleep(3.1)
    info = store.fs.info
    runs = []

    def run_then_info(where, *args, **kwargs):
        if not runs and kwargs.get("refresh"):  # the sweep's first re-check (not an info inside a listing)
            runs.append(None)  # once: the run below asks for info too
            runs[0] = run_putting(store, tmp_path, path)  # the mark is done: a run hits the stage cache now
        return info(where, *args, **kwargs)

    store.fs.info = run_then_info
    try:
        report = gc(store, tmp_path, grace=2, apply=True)
    finally:
        del store.fs.info
    assert runs[0].records["put0"].cache_hit
    assert report["swept"] == [] and store.verify(BLOB, oid).ok


def test_run_only_in_the_backend_still_protects(store, tmp_path):
    result = run_putting(store, tmp_path, blob_file(tmp_path, "remote-only", 100))
    oid = next(iter(result.manifest["artifacts"].values()))["hash"]
    remove_run(store, tmp_path, result.run_id, backend=False)
    report = gc(store, tmp_path, grace=0, apply=True)
    assert report["runs_kept"] == [result.run_id] and report["swept"] == []
    assert store.verify(BLOB, oid).ok
    remove_run(store, tmp_path, result.run_id, local=False)
    assert [s["hash"] for s in gc(store, tmp_path, grace=0)["swept"]] == [oid]


@pytest.mark.parametrize("where", ["local", "backend"])
def test_damaged_run_manifest_aborts_with_nothing_deleted(store, tmp_path, where):
    junk = put(store, tmp_path, "junk")
    run_id = "run-20260101-000000-deadbeef"
    if where == "local":
        (tmp_path / "runs" / run_id).mkdir(parents=True)
        (tmp_path / "runs" / run_id / "manifest.json").write_bytes(b'{"run_id": "run-2026')
        named = str(tmp_path / "runs" / run_id / "manifest.json")
    else:
        store.put_bytes(b'{"run_id": "run-2026', f"runs/{run_id}/manifest.json")
        named = store.backend.path("runs", run_id, "manifest.json")
    before = snapshot(store)
    with pytest.raises(IntegrityError) as err:
        gc(store, tmp_path, grace=0, apply=True)
    assert str(err.value).startswith(f"run manifest {named} is damaged") and "\n" not in str(err.value)
    assert "nothing deleted" in str(err.value)
    assert snapshot(store) == before and store.verify(BLOB, junk.oid).ok


def test_unresolvable_keep_is_one_error_and_deletes_nothing(store, tmp_path):
    junk = put(store, tmp_path, "junk")
    with pytest.raises(ArtifactNotFound) as err:
        gc(store, tmp_path, grace=0, apply=True, keep=["no-such-name:v1"])
    assert "no-such-name" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(Exception, match="no object 0{64}"):
        gc(store, tmp_path, grace=0, apply=True, keep=["0" * 64])
    with pytest.raises(ConfigError, match="keep_runs=-1"):
        gc(store, tmp_path, grace=0, apply=True, keep_runs=-1)
    with pytest.raises(ConfigError, match="keep_since='last tuesday'"):
        gc(store, tmp_path, grace=0, apply=True, keep_since="last tuesday")
    assert store.verify(BLOB, junk.oid).ok


def test_orphan_manifest_is_swept(store, tmp_path):
    lost = put(store, tmp_path, "lost")
    store.fs.rm_file(store.object_path(BLOB, lost.oid))  # what a gc killed half-way leaves
    report = gc(store, tmp_path, grace=0, apply=True)
    assert [(s["hash"], s["what"]) for s in report["swept"]] == [(lost.oid, "orphan-manifest")]
    store.fs.invalidate_cache()
    assert not store.fs.exists(store.manifest_path(BLOB, lost.oid))


def test_swept_stage_cache_hit_runs_again(store, tmp_path):
    path = blob_file(tmp_path, "cached", 500)
    first = run_putting(store, tmp_path, path, fetch=True)
    second = run_putting(store, tmp_path, path, fetch=True)
    assert all(r.cache_hit for r in second.records.values())
    oid = first.records["put0"].outputs["artifact"].oid
    for run in (first, second):  # nothing refers to the blob any more, but the stage cache
        remove_run(store, tmp_path, run.run_id)

    dry = gc(store, tmp_path, grace=0)
    assert [s["hash"] for s in dry["swept"]] == [oid] and dry["stage_cache_dropped"] == 2
    done = gc(store, tmp_path, grace=0, apply=True)
    assert done["stage_cache_dropped"] == 2 and "2 stage-cache records dropped" in done["text"]
    assert not store.exists(BLOB, oid)

    third = run_putting(store, tmp_path, path, fetch=True)
    assert third.status == "completed"
    assert not any(r.cache_hit for r in third.records.values())  # both stages ran again
    assert store.verify(BLOB, oid).ok


def test_backend_failure_mid_sweep_is_one_line_saying_what_was_deleted(seaweed, tmp_path):
    from faultproxy import FaultProxy

    root = f"t-gc-{os.getpid()}-{time.time_ns()}"
    direct = ArtifactStore(seaweedfs_backend(filer_url=seaweed.filer_url, root=root))
    junk = sorted((put(direct, tmp_path, f"junk-{i}") for i in range(3)), key=lambda p: p.oid)
    with FaultProxy(seaweed.ports.filer) as proxy:
        via = ArtifactStore(seaweedfs_backend(filer_url=proxy.url, root=root, retries=1, backoff=0.01, timeout=5))
        remove = via.fs.rm_file

        def rm_then_fail(path):
            remove(path)
            if path.endswith(".manifest.json"):
                proxy.close()  # the filer is gone after the first object and its manifest

        via.fs.rm_file = rm_then_fail
        with pytest.raises(BackendError) as err:
            gc(via, tmp_path, grace=0, apply=True, workers=1)  # one at a time: exactly one gets through
    message = str(err.value)
    assert "\n" not in message and "gc stopped after deleting 1 objects" in message
    assert [s["hash"] for s in err.value.report["swept"]] == [junk[0].oid]
    assert not direct.exists(BLOB, junk[0].oid)
    assert all(direct.verify(BLOB, p.oid).ok for p in junk[1:])
    finish = gc(direct, tmp_path, grace=0, apply=True)
    assert [s["hash"] for s in finish["swept"]] == [p.oid for p in junk[1:]]
