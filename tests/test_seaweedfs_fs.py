"""The SeaweedFS filer filesystem against a real filer: fsspec's own conformance
tests plus the operations the store relies on."""

import uuid

import fsspec
import fsspec.tests.abstract as abstract
import pytest

from slp_runner.backends.seaweedfs import SeaweedFSFileSystem


@pytest.fixture(scope="module")
def weedfs(seaweed):
    return fsspec.filesystem("seaweedfs", filer_url=seaweed.filer_url, skip_instance_cache=True)


class SeaweedFixtures(abstract.AbstractFixtures):
    @pytest.fixture
    def fs(self, weedfs):
        return weedfs

    @pytest.fixture
    def fs_path(self, weedfs):
        path = f"abstract-{uuid.uuid4().hex[:8]}"
        yield path
        if weedfs.exists(path):
            weedfs.rm(path, recursive=True)


class TestSeaweedCopy(abstract.AbstractCopyTests, SeaweedFixtures):
    pass


class TestSeaweedGet(abstract.AbstractGetTests, SeaweedFixtures):
    pass


class TestSeaweedPut(abstract.AbstractPutTests, SeaweedFixtures):
    pass


class TestSeaweedOpen(abstract.AbstractOpenTests, SeaweedFixtures):
    pass


class TestSeaweedPipe(abstract.AbstractPipeTests, SeaweedFixtures):
    pass


# -- what the store relies on, beyond the abstract suite ------------------------------


@pytest.fixture
def base(weedfs):
    path = f"own-{uuid.uuid4().hex[:8]}"
    yield path
    if weedfs.exists(path):
        weedfs.rm(path, recursive=True)


def test_registered_through_fsspec_entry_point():
    assert fsspec.get_filesystem_class("seaweedfs") is SeaweedFSFileSystem


def test_range_reads_and_random_access(weedfs, base):
    data = bytes(range(256)) * 4096  # 1 MiB
    path = f"{base}/r.bin"
    weedfs.pipe_file(path, data)
    assert weedfs.cat_file(path, start=10, end=20) == data[10:20]
    assert weedfs.cat_file(path, start=-5) == data[-5:]
    assert weedfs.cat_file(path, start=len(data) + 10) == b""
    with weedfs.open(path, "rb", block_size=4096) as f:
        f.seek(500_000)
        assert f.read(100) == data[500_000:500_100]


def test_streaming_read_and_write(weedfs, base):
    data = uuid.uuid4().bytes * 300_000  # ~4.6 MiB, more than one write block
    path = f"{base}/s.bin"
    with weedfs.open(path, "wb", block_size=1024 * 1024) as f:
        for i in range(0, len(data), 700_000):
            f.write(data[i : i + 700_000])
    with weedfs.open(path, "rb", block_size=0) as f:  # one streamed GET
        chunks = []
        while chunk := f.read(1_000_000):
            chunks.append(chunk)
    assert b"".join(chunks) == data
    assert weedfs.info(path)["size"] == len(data)


def test_listing_pages_through_large_folders(weedfs, base, monkeypatch):
    import slp_runner.backends.seaweedfs as mod

    monkeypatch.setattr(mod, "_LIST_PAGE", 3)
    for i in range(8):
        weedfs.pipe_file(f"{base}/f{i}", b"x")
    names = weedfs.ls(base, detail=False)
    assert sorted(names) == [f"{base}/f{i}" for i in range(8)]


def test_mv_is_a_rename_that_replaces(weedfs, base):
    weedfs.pipe_file(f"{base}/a", b"new")
    weedfs.pipe_file(f"{base}/b", b"old")
    weedfs.mv(f"{base}/a", f"{base}/b")
    assert weedfs.cat_file(f"{base}/b") == b"new"
    assert not weedfs.exists(f"{base}/a")
    with pytest.raises(FileNotFoundError):
        weedfs.mv(f"{base}/missing", f"{base}/c")


def test_errors_map_to_builtin_oserrors(weedfs, base):
    with pytest.raises(FileNotFoundError):
        weedfs.info(f"{base}/nope")
    with pytest.raises(FileNotFoundError):
        weedfs.cat_file(f"{base}/nope")
    with pytest.raises(FileNotFoundError):
        weedfs.rm(f"{base}/nope")


def test_unreachable_filer_names_the_url():
    fs = SeaweedFSFileSystem(filer_url="http://127.0.0.1:9", timeout=2, skip_instance_cache=True)
    with pytest.raises(ConnectionError, match=r"unreachable at http://127\.0\.0\.1:9"):
        fs.info("x")


def test_a_streamed_read_knows_the_size_from_its_first_answer(weedfs, base):
    from slp_runner.backends.seaweedfs import StreamedRead

    data = uuid.uuid4().bytes * 70_000  # 1.1 MB
    path = f"{base}/o.bin"
    weedfs.pipe_file(path, data)
    weedfs.pipe_file(f"{base}/empty", b"")
    for offset in (0, 1, 500_000, len(data) - 1, len(data)):
        with StreamedRead(weedfs, path, offset, chunk=65536) as read:
            assert read.size == len(data)  # before a byte is read
            got = []
            read.stream(got.append)
        assert b"".join(got) == data[offset:]
    with StreamedRead(weedfs, f"{base}/empty") as read:
        assert read.size == 0
        got = []
        read.stream(got.append)
        assert got == []
    with pytest.raises(FileNotFoundError):
        StreamedRead(weedfs, f"{base}/missing")
    unread = StreamedRead(weedfs, path)
    unread.close()  # dropped unread: the next request on the session still works
    assert weedfs.cat_file(path, start=0, end=4) == data[:4]


def test_a_put_up_to_64_mib_asks_for_2_mib_chunks(weedfs, base, tmp_path):
    # The filer stores one chunk while it receives the next: smaller chunks end a small
    # PUT sooner (SMALL_PUT_MAX). What it stored is what the entry's metadata lists.
    import os

    import requests

    from slp_runner.backends.seaweedfs import SMALL_PUT_CHUNK_MB, SMALL_PUT_MAX

    chunk_sizes = {}
    for name, size in (("small", 9 * 1024 * 1024), ("large", SMALL_PUT_MAX + 1)):
        local = tmp_path / name
        with open(local, "wb") as f:
            f.truncate(size)
        weedfs.put_file(str(local), f"{base}/{name}")
        entry = requests.get(f"{weedfs.filer_url}/{base}/{name}", params={"metadata": "true"}, timeout=10).json()
        chunk_sizes[name] = max(c["size"] for c in entry["chunks"])
        assert sum(c["size"] for c in entry["chunks"]) == size
        os.unlink(local)
    assert chunk_sizes["small"] == SMALL_PUT_CHUNK_MB * 1024 * 1024
    assert chunk_sizes["large"] > SMALL_PUT_CHUNK_MB * 1024 * 1024  # the filer's own (4 MiB by default)
