"""The embedded default's filesystem: fsspec's LocalFileSystem, whose put tells its
progress callback how far the copy got. fsspec's copies with ``shutil.copyfile`` and
reports nothing, so a 10 GiB local put showed a bar that stood at zero until the end."""

from __future__ import annotations

import errno
import os

from fsspec.callbacks import DEFAULT_CALLBACK
from fsspec.implementations.local import LocalFileSystem

COPY_BLOCK = 64 * 1024 * 1024  # bytes per step of a copy in the kernel: a progress update each
BUFFER = 8 * 1024 * 1024  # bytes per step of a copy through this process
# copy_file_range between these two files cannot be done (another filesystem on an
# older kernel, a filesystem without it): copy through this process instead.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


class ReportingLocalFileSystem(LocalFileSystem):
    def put_file(self, path1, path2, callback=DEFAULT_CALLBACK, **kwargs):
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        if callback is None or callback is DEFAULT_CALLBACK or not os.path.isfile(path1):
            return self.cp_file(path1, path2, **kwargs)
        if self.auto_mkdir:
            self.makedirs(self._parent(path2), exist_ok=True)
        copy_reporting(path1, path2, callback)


def copy_reporting(src: str, dst: str, callback) -> None:
    """Copy ``src`` to ``dst`` (made or truncated) in COPY_BLOCK steps, each told to
    ``callback``: in the kernel where it can (``copy_file_range``: no bytes through
    this process, a reflink on filesystems that have them), else through one buffer."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        callback.set_size(os.fstat(fin.fileno()).st_size)
        in_kernel = hasattr(os, "copy_file_range")
        buffer = None
        while True:
            if in_kernel:
                try:
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), COPY_BLOCK)
                except OSError as exc:
                    if exc.errno not in _NO_KERNEL_COPY or fin.tell() or fout.tell():
                        raise
                    in_kernel = False
                    continue
            else:
                buffer = buffer or memoryview(bytearray(BUFFER))
                n = fin.readinto(buffer)
                fout.write(buffer[:n])
            if not n:
                return
            callback.relative_update(n)
