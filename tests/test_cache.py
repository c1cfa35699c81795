"""The verified local cache: hits, corruption, repair and concurrent gets."""

import multiprocessing
import os

import pytest

from slp_runner.artifacts import BLOB
from slp_runner.backends import local_backend
from slp_runner.cache import LocalCache
from slp_runner.store import ArtifactStore


@pytest.fixture
def stored(store, small_file):
    return store.put(str(small_file), BLOB).oid


def test_second_get_is_a_stat_validated_hit(store, cache, stored):
    first = cache.get(store, BLOB, stored)
    second = cache.get(store, BLOB, stored)
    assert (first.cache_hit, first.validation) == (False, "download")
    assert (second.cache_hit, second.validation) == (True, "stat")
    assert second.path == first.path
    assert os.stat(first.path).st_mode & 0o222 == 0  # read-only entry


def test_full_verify_rehashes_a_hit(store, cache, stored):
    cache.get(store, BLOB, stored)
    assert cache.get(store, BLOB, stored, full_verify=True).validation == "rehash"


def test_corrupted_entry_is_detected_and_fetched_again(store, cache, stored, small_file):
    path = cache.get(store, BLOB, stored).path
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(5)
        f.write(b"\x00\x01\x02")
    again = cache.get(store, BLOB, stored)
    assert again.repaired and not again.cache_hit
    assert open(path, "rb").read() == small_file.read_bytes()


def test_lost_record_falls_back_to_rehash(store, cache, stored):
    path = cache.get(store, BLOB, stored).path
    os.unlink(path + ".verified")
    got = cache.get(store, BLOB, stored)
    assert (got.cache_hit, got.validation) == (True, "rehash")


def _get_in_process(args):
    store_root, cache_root, oid = args
    got = LocalCache(cache_root).get(ArtifactStore(local_backend(store_root)), BLOB, oid)
    return got.cache_hit, open(got.path, "rb").read()


def test_concurrent_processes_download_once(tmp_path, small_file):
    store_root, cache_root = str(tmp_path / "store"), str(tmp_path / "cache")
    oid = ArtifactStore(local_backend(store_root)).put(str(small_file), BLOB).oid
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_get_in_process, [(store_root, cache_root, oid)] * 4)
    assert sorted(hit for hit, _ in results) == [False, True, True, True]
    assert all(data == small_file.read_bytes() for _, data in results)
