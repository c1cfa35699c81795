"""The local backend's put reports its copy as it goes (fsspec's LocalFileSystem copies
with shutil and reports nothing): in the kernel where it can, through the process
across filesystems. Real files; the cross-filesystem copy is from tmpfs (/dev/shm)."""

from __future__ import annotations

import os

import pytest
from fsspec.callbacks import Callback

import slp_runner.backends.local as local
from slp_runner.artifacts import BLOB
from slp_runner.backends import local_backend
from slp_runner.store import ArtifactStore
from test_integrity import small_disk  # noqa: F401  (a real 2 MiB filesystem)

MiB = 1024 * 1024


class Recording(Callback):
    def __init__(self):
        super().__init__()
        self.sizes, self.steps = [], []

    def set_size(self, size):
        self.sizes.append(size)
        super().set_size(size)

    def relative_update(self, inc=1):
        self.steps.append(inc)
        super().relative_update(inc)


def test_a_local_put_reports_its_copy_step_by_step(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "COPY_BLOCK", 16 * MiB)
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(40 * MiB))
    store = ArtifactStore(local_backend(root=str(tmp_path / "store")))
    seen = Recording()
    put = store.put(str(path), BLOB, callback=seen)
    assert seen.sizes[-1] == 40 * MiB and seen.steps == [16 * MiB, 16 * MiB, 8 * MiB]
    with open(put.object_path, "rb") as f:
        assert f.read() == path.read_bytes()


def test_a_copy_across_filesystems_goes_through_the_process(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "COPY_BLOCK", 4 * MiB)
    data = os.urandom(10 * MiB + 5)
    src = f"/dev/shm/slp-test-{os.getpid()}.bin"
    with open(src, "wb") as f:
        f.write(data)
    try:
        assert os.stat(src).st_dev != os.stat(tmp_path).st_dev  # tmpfs to the test's disk
        seen = Recording()
        local.copy_reporting(src, str(tmp_path / "copy.bin"), seen)  # copy_file_range: EXDEV, then read/write
    finally:
        os.unlink(src)
    assert (tmp_path / "copy.bin").read_bytes() == data
    assert seen.steps == [local.BUFFER, len(data) - local.BUFFER] and seen.sizes == [len(data)]


def test_a_local_put_with_no_one_watching_copies_as_fsspec_does(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1000)
    store = ArtifactStore(local_backend(root=str(tmp_path / "store")))
    put = store.put(str(path), BLOB)
    with open(put.object_path, "rb") as f:
        assert f.read() == b"x" * 1000
    store.fs.put_file(str(path), str(tmp_path / "plain" / "f.bin"), callback=None)  # fsspec's own callers may pass None
    assert (tmp_path / "plain" / "f.bin").read_bytes() == b"x" * 1000


def test_a_local_put_reported_onto_a_full_disk_fails_in_one_line_and_keeps_nothing(tmp_path, small_disk):
    from slp_runner.errors import BackendError

    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3 * MiB))  # the disk holds 2
    store = ArtifactStore(local_backend(root=str(small_disk / "store")))
    with pytest.raises(BackendError, match=r"^local backend at .*: storing .* failed: \[Errno 28\] No space left"):
        store.put(str(path), BLOB, callback=Recording())
    assert [os.path.join(d, f) for d, _, files in os.walk(small_disk) for f in files] == []
