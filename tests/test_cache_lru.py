"""A capped cache: LRU order, pins, entries held by another process, concurrent gets
while pruning, and an artifact larger than the cap, on every backend."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import blake3
import pytest

from slp_runner import cache_lru
from slp_runner.artifacts import BLOB, PROMPTS
from slp_runner.cache import LocalCache
from slp_runner.errors import OutputError

MiB = 1024 * 1024
SLP = os.path.join(os.path.dirname(sys.executable), "slp")


def put_blob(store, tmp_path, size=MiB):
    path = tmp_path / f"{uuid.uuid4().hex}.bin"
    path.write_bytes(os.urandom(size))
    return store.put(str(path), BLOB).oid


def cached(cache):
    return {e.oid for e in cache_lru.entries(cache.root)}


def test_a_capped_cache_evicts_least_recently_used_first(store, tmp_path):
    a, b, c, d = (put_blob(store, tmp_path) for _ in range(4))
    cache = LocalCache(str(tmp_path / "cache"), max_size=3 * MiB)
    for oid in (a, b, c):
        cache.get(store, BLOB, oid)
        time.sleep(0.01)  # distinct last-use times
    cache.release()  # nothing held: eviction is free to choose by last use alone
    cache.get(store, BLOB, a)  # a hit: a is now the most recently used
    cache.release()
    cache.get(store, BLOB, d)  # 4 MiB > 3 MiB: the least recently used (b) goes
    assert cached(cache) == {a, c, d}
    cache.release()
    time.sleep(0.01)
    cache.get(store, BLOB, b)  # back again; c is now the oldest
    assert cached(cache) == {a, d, b}
    assert sum(e.size for e in cache_lru.entries(cache.root)) <= 3 * MiB


def test_pinned_and_held_entries_are_never_evicted(store, tmp_path):
    pinned, held, other, new = (put_blob(store, tmp_path) for _ in range(4))
    root = str(tmp_path / "cache")
    cache = LocalCache(root, max_size=3 * MiB)
    for oid in (pinned, held, other):
        cache.get(store, BLOB, oid)
    cache.release()
    cache_lru.pin(root, BLOB, pinned)
    # another process gets `held` and keeps it (as a run keeps the model it serves)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        from slp_runner.cache import LocalCache
        from slp_runner.artifacts import BLOB, PROMPTS
        from slp_runner.store import ArtifactStore
        cache = LocalCache({root!r})
        cache._holds.hold(cache.path_for(BLOB, {held!r}))
        print("holding", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        listing = {e.oid: e.pinned for e in cache_lru.mark_kept(cache_lru.entries(root), root, None, None)}
        assert listing == {pinned: "pin", held: "in use", other: None}
        cache.get(store, BLOB, new)  # needs room: only `other` may go
        assert cached(cache) == {pinned, held, new}
        cache.release()
        dry = cache_lru.prune(root, 0, apply=False)
        assert {e.oid for e in dry.evicted} == {new} and dry.kept_pinned == 2 * MiB
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed: the kernel dropped its lock); unpinned, both may go
    cache_lru.unpin(root, pinned)
    done = cache_lru.prune(root, 0)
    assert {e.oid for e in done.evicted} == {pinned, held, new} and cached(cache) == set()


def test_an_artifact_larger_than_the_cap_is_refused_before_any_byte(store, tmp_path):
    big = put_blob(store, tmp_path, 2 * MiB)
    root = tmp_path / "cache"
    cache = LocalCache(str(root), max_size=MiB)
    with pytest.raises(OutputError, match=rf"blob {big} is {2 * MiB} bytes \(2.0 MiB\), more than the whole cache "
                                          r"may hold \(cache.max_size=1048576 bytes"):
        cache.get(store, BLOB, big)
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    assert leftovers == []


def test_concurrent_gets_while_pruning_stay_correct(store, tmp_path):
    oids = [put_blob(store, tmp_path, 256 * 1024) for _ in range(8)]
    root = str(tmp_path / "cache")
    errors, stop = [], threading.Event()

    def getter(i):
        cache = LocalCache(root, max_size=MiB)  # room for 4 of the 8
        try:
            for n in range(12):
                oid = oids[(i * 3 + n) % len(oids)]
                got = cache.get(store, BLOB, oid)
                with open(got.path, "rb") as f:  # held: the bytes are there and right
                    if blake3.blake3(f.read()).hexdigest() != oid:
                        errors.append(f"wrong bytes for {oid}")
                cache.release()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    def pruner():
        while not stop.is_set():
            cache_lru.prune(root, 512 * 1024)

    threads = [threading.Thread(target=getter, args=(i,)) for i in range(4)]
    prune_thread = threading.Thread(target=pruner)
    prune_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    prune_thread.join()
    assert errors == []
    for e in cache_lru.entries(root):  # whatever is left is whole and right
        with open(e.path, "rb") as f:
            assert blake3.blake3(f.read()).hexdigest() == e.oid


def test_keep_runs_keeps_what_the_newest_runs_used(tmp_path, prompts_file):
    env = dict(os.environ, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    runs = f"runner.runs_dir={tmp_path / 'runs'}"
    run = subprocess.run([SLP, "pipeline=store_prompts", f"prompts.path={prompts_file}", runs], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(4096))
    put = json.loads(subprocess.run([SLP, "task=put", "kind=blob", f"path={other}", "format=json"], env=env,
                                    capture_output=True, text=True, timeout=120).stdout)
    subprocess.run([SLP, "task=get", f"hash={put['hash']}"], env=env, capture_output=True, timeout=120, check=True)

    def cache_task(*args):
        proc = subprocess.run([SLP, "task=cache", runs, "format=json", *args], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    listing = cache_task("cache.keep_runs=1")
    kept = {e["hash"]: e["pinned"] for e in listing["entries"]}
    assert kept[put["hash"]] is None and all(v and v.startswith("run run-") for h, v in kept.items()
                                             if h != put["hash"])
    dry = cache_task("op=prune", "cache.max_size=0", "cache.keep_runs=1")
    assert [e["hash"] for e in dry["evicted"]] == [put["hash"]] and dry["dry_run"] is True
    assert put["hash"] in {e["hash"] for e in cache_task()["entries"]}  # a dry run removed nothing
    cache_task("op=prune", "cache.max_size=0", "cache.keep_runs=1", "apply=true")
    after = cache_task()
    assert put["hash"] not in {e["hash"] for e in after["entries"]} and len(after["entries"]) == len(kept) - 1
    cleared = cache_task("op=clear")
    assert cleared["entries"] == [] and cleared["dry_run"] is False


def test_cli_cap_pin_and_refusal(tmp_path):
    env = dict(os.environ, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    hashes = []
    for i in range(3):
        path = tmp_path / f"b{i}.bin"
        path.write_bytes(os.urandom(MiB))
        hashes.append(json.loads(subprocess.run([SLP, "task=put", "kind=blob", f"path={path}", f"name=b{i}",
                                                 "format=json"], env=env, capture_output=True, text=True,
                                                timeout=120).stdout)["hash"])
    pin = subprocess.run([SLP, "task=pin", "hash=b0"], env=env, capture_output=True, text=True, timeout=120)
    assert pin.returncode == 0, pin.stderr
    for name in ("b0", "b1", "b2"):
        got = subprocess.run([SLP, "task=get", f"hash={name}", "cache.max_size=2MiB"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert got.returncode == 0, got.stderr
    listing = json.loads(subprocess.run([SLP, "task=cache", "format=json"], env=env, capture_output=True,
                                        text=True, timeout=120).stdout)
    assert {e["hash"]: (e["pinned"], e["name"]) for e in listing["entries"]} == {
        hashes[0]: ("pin", "b0"), hashes[2]: (None, "b2")}  # b1 evicted: b0 is pinned
    refused = subprocess.run([SLP, "task=get", "hash=b1", "cache.max_size=512KiB"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"slp: error: blob {hashes[1]} is 1048576 bytes (1.0 MiB), more than the whole")
    bad = subprocess.run([SLP, "task=cache", "op=prune", "cache.max_size=lots"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("slp: error: cache.max_size='lots': expected bytes")


def test_a_running_run_keeps_what_it_fetched(tmp_path, prompts_file):
    from conftest import TEST_CONF

    env = dict(os.environ, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    put = json.loads(subprocess.run([SLP, "task=put_prompts", f"prompts.path={prompts_file}", "prompts.name=p",
                                     "format=json"], env=env, capture_output=True, text=True, timeout=120).stdout)
    run = subprocess.Popen([SLP, f"hydra.searchpath=[file://{TEST_CONF}]", "pipeline=fetch_then_wait",
                            "prompts.hash=p", f"runner.runs_dir={tmp_path / 'runs'}"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        entry = LocalCache(str(tmp_path / "cache")).path_for(PROMPTS, put["hash"])
        deadline = time.time() + 30
        while not os.path.exists(entry + ".inuse") and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the hold is taken just after the entry is published
        clear = subprocess.run([SLP, "task=cache", "op=clear", "format=json"], env=env, capture_output=True,
                               text=True, timeout=120)
        assert clear.returncode == 0, clear.stderr
        report = json.loads(clear.stdout)
        assert report["evicted"] == [] and [(e["hash"], e["pinned"]) for e in report["entries"]] == [
            (put["hash"], "in use")]
        assert os.path.exists(entry)
    finally:
        run.kill()  # SIGKILL: the kernel drops the run's hold
        run.wait()
    cleared = json.loads(subprocess.run([SLP, "task=cache", "op=clear", "format=json"], env=env,
                                        capture_output=True, text=True, timeout=120).stdout)
    assert [e["hash"] for e in cleared["evicted"]] == [put["hash"]] and not os.path.exists(entry)
