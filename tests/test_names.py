"""Names, tags and short hashes, on every backend: what resolves, what is refused, and
what concurrent taggers leave behind."""

import json
import os
import subprocess
import sys
import uuid

import blake3
import pytest

from slp_runner import refs
from slp_runner.artifacts import BLOB, MODEL, PROMPTS
from slp_runner.errors import ArtifactNotFound, InputError, IntegrityError

from conftest import TEST_CONF
from test_integrity import cli_backend, cli_store

SLP = os.path.join(os.path.dirname(sys.executable), "slp")


def put_bytes(store, tmp_path, data, kind=BLOB):
    path = tmp_path / f"{uuid.uuid4().hex}.bin"
    path.write_bytes(data)
    return store.put(str(path), kind)


def colliding_pair(prefix_len=8):
    """Two byte strings whose BLAKE3 hashes share their first ``prefix_len`` hex digits
    (a birthday search: about 2^16 hashes for 8 digits)."""
    seen = {}
    i = 0
    while True:
        data = b"slp-collide-%d" % i
        head = blake3.blake3(data).hexdigest()[:prefix_len]
        if head in seen:
            return seen[head], data
        seen[head] = data
        i += 1


def test_names_tags_and_prefixes_resolve(store, tmp_path):
    old = put_bytes(store, tmp_path, b"first version")
    new = put_bytes(store, tmp_path, b"second version")
    refs.write_ref(store, "team/tiny", "v1", old.kind, old.oid, old.size)
    refs.write_ref(store, "team/tiny", "v2", new.kind, new.oid, new.size)

    assert refs.resolve(store, "team/tiny:v1").oid == old.oid
    assert refs.resolve(store, "team/tiny").oid == new.oid  # the newest put of the name
    assert refs.resolve(store, "team/tiny:latest").oid == new.oid
    by_prefix = refs.resolve(store, old.oid[:8])
    assert (by_prefix.oid, by_prefix.kind, by_prefix.via) == (old.oid, BLOB, "prefix")
    assert refs.resolve(store, old.oid.upper()).oid == old.oid  # a full hash needs no request
    # re-tagging v1 moves it, and makes it the newest
    refs.write_ref(store, "team/tiny", "v1", new.kind, new.oid, new.size)
    assert refs.resolve(store, "team/tiny:v1").oid == new.oid
    assert [r["tag"] for r in refs.tags_of(store, "team/tiny")] == ["v1", "v2"]


def test_unknown_and_ambiguous_references_list_candidates(store, tmp_path):
    a_data, b_data = colliding_pair()
    a, b = put_bytes(store, tmp_path, a_data), put_bytes(store, tmp_path, b_data)
    assert a.oid[:8] == b.oid[:8] and a.oid != b.oid
    with pytest.raises(InputError, match=rf"hash prefix {a.oid[:8]} is ambiguous: .*{a.oid[:16]}.*{b.oid[:16]}"
                       rf"|hash prefix {a.oid[:8]} is ambiguous: .*{b.oid[:16]}.*{a.oid[:16]}"):
        refs.resolve(store, a.oid[:8])
    common = os.path.commonprefix([a.oid, b.oid])
    assert refs.resolve(store, a.oid[: len(common) + 1]).oid == a.oid  # one more digit settles it
    with pytest.raises(ArtifactNotFound, match="a hash prefix needs at least 8 hex digits"):
        refs.resolve(store, a.oid[:7])
    refs.write_ref(store, "tiny", "v1", a.kind, a.oid, a.size)
    with pytest.raises(ArtifactNotFound, match=r"no artifact named tiny:v9 .*\(tags of tiny: v1\)"):
        refs.resolve(store, "tiny:v9")
    with pytest.raises(ArtifactNotFound, match="did you mean tiny"):
        refs.resolve(store, "tinny")
    with pytest.raises(InputError, match="tiny:v1 is a blob artifact .*, not a model"):
        refs.resolve(store, "tiny:v1", MODEL)
    with pytest.raises(InputError, match="invalid reference"):
        refs.resolve(store, "a:b:c")


def test_a_damaged_ref_is_reported_not_followed(store, tmp_path):
    obj = put_bytes(store, tmp_path, b"payload")
    refs.write_ref(store, "fragile", "v1", obj.kind, obj.oid, obj.size)
    store.fs.pipe_file(refs.ref_path(store, "fragile", "v1"), b'{"hash": "0000"')
    with pytest.raises(IntegrityError, match=r"ref .*fragile/v1.json is damaged"):
        refs.resolve(store, "fragile:v1")


@pytest.mark.parametrize("backend_name", ["local", "seaweedfs", "s3"])
def test_concurrent_taggers_lose_nothing(backend_name, seaweed, tmp_path):
    """Six processes tag at once: six different tags all survive (no shared index to
    lose an update), and six writers of one tag leave one of their values, whole."""
    env = dict(os.environ, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    backend = cli_backend(backend_name, seaweed, env) if backend_name != "local" else ["backend=local"]
    objs = []
    for i in range(6):
        path = tmp_path / f"o{i}.bin"
        path.write_bytes(os.urandom(1000 + i))
        put = subprocess.run([SLP, "task=put", "kind=blob", f"path={path}", "format=json", *backend], env=env,
                             capture_output=True, text=True, timeout=120)
        assert put.returncode == 0, put.stderr
        objs.append(json.loads(put.stdout)["hash"])

    def tag_all(tags):
        procs = [subprocess.Popen([SLP, "task=tag", f"hash={oid[:10]}", f"name=race:{tag}", *backend], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for oid, tag in zip(objs, tags)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err

    tag_all([f"t{i}" for i in range(6)])
    tag_all(["same"] * 6)
    store = cli_store(backend, seaweed, tmp_path) if backend_name != "local" else None
    if store is None:
        from slp_runner.backends import local_backend
        from slp_runner.store import ArtifactStore

        store = ArtifactStore(local_backend(root=str(tmp_path / "store")))
    found = {r["tag"]: r["hash"] for r in refs.tags_of(store, "race")}
    assert {f"t{i}": oid for i, oid in enumerate(objs)}.items() <= found.items()
    assert found["same"] in objs
    leftovers = [p for p in store.fs.find(store.backend.path(".incoming"))] if store.fs.exists(
        store.backend.path(".incoming")) else []
    assert leftovers == []


def run_slp(env, *args, cwd=None):
    return subprocess.run([SLP, *args], env=env, capture_output=True, text=True, timeout=180, cwd=cwd)


@pytest.mark.parametrize("backend_name", ["local", "seaweedfs", "s3"])
def test_cli_names_and_json_output(backend_name, seaweed, tmp_path, prompts_file):
    env = dict(os.environ, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    backend = cli_backend(backend_name, seaweed, env) if backend_name != "local" else ["backend=local"]

    put = run_slp(env, "task=put_prompts", f"prompts.path={prompts_file}", "prompts.name=bench/prompts",
                  "prompts.tag=v1", "format=json", *backend)
    assert put.returncode == 0, put.stderr
    record = json.loads(put.stdout)  # stdout is one JSON document, nothing else
    oid = record["hash"]
    assert (record["status"], record["name"], record["tag"], record["kind"]) == ("uploaded", "bench/prompts", "v1",
                                                                                  "prompts")
    again = json.loads(run_slp(env, "task=put_prompts", f"prompts.path={prompts_file}",
                               "prompts.name=bench/prompts:v2", "format=json", *backend).stdout)
    assert (again["status"], again["tag"]) == ("deduplicated", "v2")

    out = tmp_path / "copy.jsonl"
    get = run_slp(env, "task=get", "hash=bench/prompts:v1", f"out={out}", "format=json", *backend)
    assert get.returncode == 0, get.stderr
    got = json.loads(get.stdout)
    assert (got["hash"], got["path"], got["resolved_by"], got["cache_hit"]) == (oid, str(out), "name", False)
    assert out.read_bytes() == prompts_file.read_bytes()
    hit = json.loads(run_slp(env, "task=get_prompts", f"hash={oid[:8]}", "format=json", *backend).stdout)
    assert (hit["hash"], hit["cache_hit"], hit["resolved_by"]) == (oid, True, "prefix")

    show = json.loads(run_slp(env, "task=show", "hash=bench/prompts", "format=json", *backend).stdout)
    assert show["blake3"] == oid and show["metadata"]["record_count"] == 2
    verify = run_slp(env, "task=verify", f"hash={oid[:12]}", "format=json", *backend)
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"] is True

    tag = run_slp(env, "task=tag", f"hash={oid[:9]}", "name=other", "tag=stable", "format=json", *backend)
    assert tag.returncode == 0, tag.stderr
    listing = json.loads(run_slp(env, "task=ls", "format=json", *backend).stdout)
    (row,) = listing["artifacts"]
    assert row["hash"] == oid and sorted(row["names"]) == ["bench/prompts:v1", "bench/prompts:v2", "other:stable"]
    assert row["size"] == prompts_file.stat().st_size and row["modified"].endswith("Z")
    text = run_slp(env, "task=ls", *backend).stdout
    assert "other:stable" in text and f"{prompts_file.stat().st_size} B" in text and oid[:12] in text

    untag = run_slp(env, "task=untag", "name=other:stable", *backend)
    assert untag.returncode == 0, untag.stderr
    gone = run_slp(env, "task=get", "hash=other:stable", *backend)
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1
    assert gone.stderr.startswith("slp: error: no artifact named other:stable")
    wrong_kind = run_slp(env, "task=get_model", "hash=bench/prompts", *backend)
    assert wrong_kind.returncode == 1 and "is a prompts artifact" in wrong_kind.stderr


def test_a_pipeline_runs_with_the_resolved_hash(tmp_path, prompts_file):
    env = dict(os.environ, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    put = json.loads(run_slp(env, "task=put_prompts", f"prompts.path={prompts_file}", "prompts.name=p:v1",
                             "format=json").stdout)
    blob = tmp_path / "b.bin"
    blob.write_bytes(b"a blob")
    blob_oid = json.loads(run_slp(env, "task=put", "kind=blob", f"path={blob}", "name=fixture-blob:v1",
                                  "format=json").stdout)["hash"]
    run = run_slp(env, f"hydra.searchpath=[file://{TEST_CONF}]", "pipeline=fetch_named", "prompts.hash=p",
                  f"runner.runs_dir={runs}")
    assert run.returncode == 0, run.stderr
    (folder,) = [runs / d for d in os.listdir(runs) if d.startswith("run-")]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["references"]["prompts.hash"] == {"reference": "p", "hash": put["hash"], "kind": "prompts",
                                                      "resolved_by": "name"}
    assert manifest["references"]["pipeline.stages.fetch_blob.inputs.hash"]["hash"] == blob_oid
    assert manifest["artifacts"]["fetch_prompts.prompts"]["hash"] == put["hash"]
    saved = (folder / "config.yaml").read_text()
    assert put["hash"] in saved and blob_oid in saved and "fixture-blob:v1" not in saved

    # the name moves on; the stage cache must not serve the old bytes under the name
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "z", "prompt": "other"}\n')
    moved = json.loads(run_slp(env, "task=put_prompts", f"prompts.path={other}", "prompts.name=p:v2",
                               "format=json").stdout)
    rerun = run_slp(env, f"hydra.searchpath=[file://{TEST_CONF}]", "pipeline=fetch_named", "prompts.hash=p",
                    f"runner.runs_dir={runs}", "format=text")
    assert rerun.returncode == 0, rerun.stderr
    manifests = [json.loads((runs / d / "manifest.json").read_text()) for d in os.listdir(runs) if d.startswith("run-")]
    latest = max(manifests, key=lambda m: m["start_time"])
    assert latest["artifacts"]["fetch_prompts.prompts"]["hash"] == moved["hash"]


def test_fsck_reports_damaged_and_dangling_names(store, tmp_path):
    from slp_runner import fsck
    from slp_runner.cache import LocalCache

    kept = put_bytes(store, tmp_path, b"kept")
    lost = put_bytes(store, tmp_path, b"lost")
    refs.write_ref(store, "good", "v1", kept.kind, kept.oid, kept.size)
    refs.write_ref(store, "lost", "v1", lost.kind, lost.oid, lost.size)
    refs.write_ref(store, "broken", "v1", kept.kind, kept.oid, kept.size)
    store.fs.rm(store.object_path(lost.kind, lost.oid))
    store.fs.pipe_file(refs.ref_path(store, "broken", "v1"), b"\x00garbage")
    cache, runs = LocalCache(str(tmp_path / "cache")), str(tmp_path / "runs")

    found = {(f.what, f.where.rsplit("/", 2)[-2]): f for f in fsck.fsck(store, cache, runs, out=open(os.devnull, "w"))}
    assert set(found) == {("damaged-ref", "broken"), ("dangling-ref", "lost")}
    assert lost.oid in found[("dangling-ref", "lost")].detail
    fixed = fsck.fsck(store, cache, runs, fix=True, out=open(os.devnull, "w"))
    assert [(f.what, f.fixed) for f in fixed] == [("damaged-ref", True), ("dangling-ref", False)]
    assert refs.read_ref(store, "broken", "v1") is None and refs.resolve(store, "good").oid == kept.oid


@pytest.mark.parametrize("bad, why", [
    ("p/q/c.json", "may not end in .json"),
    ("deadbeef00", "read as a hash prefix"),
    ("a/b/c/d/e", "at most 4 parts"),
    ("../up", "invalid name"),
])
def test_names_that_could_collide_or_shadow_are_refused(store, tmp_path, bad, why):
    obj = put_bytes(store, tmp_path, b"x")
    with pytest.raises(InputError, match=why):
        refs.write_ref(store, bad, "t1", obj.kind, obj.oid, obj.size)
    assert refs.all_refs(store) == []


def test_a_ref_that_says_another_name_is_damaged(store, tmp_path):
    obj = put_bytes(store, tmp_path, b"y")
    refs.write_ref(store, "real", "v1", obj.kind, obj.oid, obj.size)
    data = store.fs.cat_file(refs.ref_path(store, "real", "v1"))
    store.fs.pipe_file(refs.ref_path(store, "real", "v2"), data)  # copied by hand: says real:v1
    with pytest.raises(IntegrityError, match=r"real/v2.json is damaged \(it says real:v1\)"):
        refs.resolve(store, "real:v2")
    damaged = []
    assert [r["tag"] for r in refs.all_refs(store, damaged)] == ["v1"] and len(damaged) == 1


def test_named_puts_in_pipelines_write_their_name_every_run(tmp_path, prompts_file):
    env = dict(os.environ, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    args = ["pipeline=store_prompts", f"prompts.path={prompts_file}", "prompts.name=sp", "prompts.tag=v1",
            f"runner.runs_dir={tmp_path / 'runs'}"]
    assert run_slp(env, *args).returncode == 0
    assert run_slp(env, "task=untag", "name=sp:v1").returncode == 0
    again = run_slp(env, *args)  # the put stage is not served from the stage cache: the name comes back
    assert again.returncode == 0, again.stderr
    listing = json.loads(run_slp(env, "task=ls", "name=sp:v1", "format=json").stdout)
    assert [r["names"] for r in listing["artifacts"]] == [["sp:v1"]]


def test_the_same_bytes_under_two_kinds_keep_their_own_names(store, tmp_path):
    from slp_runner import commands

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n')
    as_prompts = store.put(str(path), PROMPTS)
    as_blob = store.put(str(path), BLOB)
    assert as_prompts.oid == as_blob.oid
    refs.write_ref(store, "myp", "1.0", as_prompts.kind, as_prompts.oid, as_prompts.size)
    refs.write_ref(store, "dup", "blob", as_blob.kind, as_blob.oid, as_blob.size)
    rows = commands.list_artifacts(store, [BLOB, as_prompts.kind], out=open(os.devnull, "w"))["artifacts"]
    assert {r["kind"]: r["names"] for r in rows} == {"blob": ["dup:blob"], "prompts": ["myp:1.0"]}
    with pytest.raises(InputError, match=r"stored as blob and as prompts .*give kind=<blob\|prompts>|"
                                         r"stored as prompts and as blob .*give kind=<prompts\|blob>"):
        refs.resolve(store, as_blob.oid[:10])


def test_a_missing_hash_fails_before_the_run_starts(tmp_path):
    env = dict(os.environ, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    run = run_slp(env, "pipeline=run_infer", "model.hash=" + "0" * 64, f"runner.runs_dir={tmp_path / 'runs'}")
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == ("slp: error: missing prompts.hash=<hash, 8+ hex prefix or name[:tag]> "
                          "(stage 'fetch_prompts' fetches it)\n")
    assert not (tmp_path / "runs").exists()
