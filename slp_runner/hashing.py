"""BLAKE3 content addressing: the object id (``oid``) of an artifact.

Files on disk are hashed through ``mmap`` with blake3's own thread pool
(``max_threads=AUTO``), which is several times faster than feeding chunks from
Python. Streams (downloads) are hashed chunk by chunk as they pass.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
from dataclasses import dataclass

import blake3

from .errors import InvalidHash

OID_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 8 * 1024 * 1024


def validate_oid(oid: object) -> str:
    """Return ``oid`` if it is 64 lowercase hex characters, else raise InvalidHash."""
    if not isinstance(oid, str) or not OID_RE.fullmatch(oid):
        raise InvalidHash(f"invalid hash {oid!r}: expected 64 lowercase hex characters (BLAKE3)")
    return oid


@dataclass(frozen=True)
class FileDigest:
    blake3: str
    size: int
    sha256: str | None = None


def hash_file(path: str | os.PathLike, *, sha256: bool = False) -> FileDigest:
    """Hash a local file in one pass (BLAKE3, and sha256 from the same mapping if asked)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        sha = hashlib.sha256() if sha256 else None
        if size == 0:
            return FileDigest(hasher.hexdigest(), 0, sha.hexdigest() if sha else None)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            mm.madvise(mmap.MADV_SEQUENTIAL)
            if sha is None:
                hasher.update(mm)
            else:
                # Walk the mapping once so both hashes see each page while it is hot.
                with memoryview(mm) as view:
                    for off in range(0, size, CHUNK):
                        with view[off : off + CHUNK] as block:
                            hasher.update(block)
                            sha.update(block)
    return FileDigest(hasher.hexdigest(), size, sha.hexdigest() if sha else None)


class StreamHasher:
    """Hash bytes as they stream past (downloads, re-reads from a backend)."""

    def __init__(self, sha256: bool = False):
        self._b3 = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self._sha = hashlib.sha256() if sha256 else None
        self.size = 0

    def update(self, data) -> None:
        self._b3.update(data)
        if self._sha is not None:
            self._sha.update(data)
        self.size += len(data)

    def digest(self) -> FileDigest:
        return FileDigest(self._b3.hexdigest(), self.size, self._sha.hexdigest() if self._sha else None)
