"""The verified local cache that every get goes through.

Layout mirrors the backend (``<cache>/models/<hash>.gguf``), so a cached model is a
plain GGUF path llama-server can load. Beside each object, ``<name>.verified``
records the size, mtime, ctime and inode seen at the last full BLAKE3 check: a hit
whose stat still matches is trusted without reading the file (microseconds for a
multi-GB model); anything else is re-hashed, and a mismatch is thrown away and
fetched again. The ctime is what makes the record trustworthy: every write, chmod
or ``touch -d`` sets it to the present, and no user call can set it back, so an
entry edited and given back its old mtime still fails the stat check. What the
stat check cannot see (the disk silently flipping bits, or someone resetting the
clock or writing the block device) is what ``full_verify=true`` is for.

Downloads stream into a partial file in the same folder while they are hashed and
are renamed into place only when the hash matches. A per-object file lock
makes concurrent gets of one hash (threads or processes) download it once.

Resuming. A download cut by a dropped connection continues in-process from the next
byte with a ranged read (``ArtifactStore.stream_object``; the hasher keeps its
state). A get that died (killed, or out of retries) leaves its bytes in
``<cache>/<kind folder>/.<oid>.partial``; the next get of that hash hashes the kept
prefix locally (BLAKE3 is sequential: the prefix is fed to the hasher) and fetches
only the rest. The final BLAKE3 check still covers every byte: if it fails, the
partial is thrown away, and a resumed download is tried once more from zero. A get
that fails for another reason (a full disk, bytes that do not hash right, a hash
the backend does not have) removes its partial; none ever leaves a ``.part``.
The local backend is copied by the kernel, without a network to lose, so it does
not resume (its temporary ``.part`` is removed on failure).

What this relies on: the partial is only touched under the object's lock,
``<entry>.lock``, a ``flock`` taken through ``filelock`` (which falls back to a
lock-file marker where the filesystem has no ``flock``). On NFS ``flock`` may be
emulated per client or be a no-op, and the partial's name depends only on the hash,
so two hosts sharing a cache folder over NFS could write one partial at once; the
hash check would catch the damage, but give each host its own ``cache_dir``. The
lock file stays after the get (filelock does not remove it, so that a waiting
process never locks a file another one just unlinked): one empty file per hash
ever fetched, not per attempt; ``task=fsck`` removes those of absent entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import orjson

from .artifacts import KINDS, ArtifactKind
from .errors import ArtifactNotFound, IntegrityError, OutputError
from .hashing import OID_RE, WINDOW, StreamHasher, file_version, hash_file, validate_oid
from . import cache_lru
from .local_output import create_temp_at, ensure_room, human, local_write, temp_name
from .manifest import utc_now

if TYPE_CHECKING:  # a hit touches neither: only a download imports them
    from fsspec.callbacks import Callback

    from .store import ArtifactStore


@dataclass
class CacheGet:
    path: str
    oid: str
    size: int
    cache_hit: bool
    validation: str  # "stat", "rehash" (hit) or "download" (miss)
    seconds: float
    repaired: bool = False  # a corrupted entry was found and fetched again
    resumed_from: int = 0  # bytes kept from an earlier get that died, not fetched again
    reconnects: int = 0  # times this download continued after a dropped connection

    @property
    def fetched(self) -> int:
        """Bytes this get brought over (not those an earlier get kept)."""
        return 0 if self.cache_hit else self.size - self.resumed_from

    @property
    def mib_per_s(self) -> float:
        """The rate of what this get did: a hit's bytes, or the bytes it fetched."""
        done = self.size if self.cache_hit else self.fetched
        return done / (1024 * 1024) / self.seconds if self.seconds > 0 else 0.0


class LocalCache:
    """The cache at ``root``. With ``max_size`` (bytes), each download first makes room
    and then evicts least recently used entries until the cache fits (see
    :mod:`.cache_lru`); entries pinned, held by a process, or used by the
    ``keep_runs`` newest runs in ``runs_dir`` are never evicted."""

    def __init__(self, root: str, *, max_size: int | None = None, runs_dir: str | None = None,
                 keep_runs: int | None = None):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.max_size, self.runs_dir, self.keep_runs = max_size, runs_dir, keep_runs
        self._holds = cache_lru.Holds()

    def release(self) -> None:
        """Let go of every entry this cache object handed out (they may be evicted again)."""
        self._holds.release()

    def path_for(self, kind: ArtifactKind, oid: str) -> str:
        return os.path.join(self.root, kind.object_name(oid))

    def entry_oid(self, path: str) -> str | None:
        """The hash ``path`` is the cache entry of, or None if it is not an entry here."""
        path = os.path.abspath(path)
        rel = os.path.relpath(path, self.root)
        if rel.startswith(os.pardir) or rel.count(os.sep) != 1:
            return None
        folder, name = rel.split(os.sep)
        for kind in KINDS.values():
            if kind.folder == folder and name.endswith(kind.suffix) and OID_RE.fullmatch(name[: -len(kind.suffix)]):
                return name[: -len(kind.suffix)]
        return None

    def entry_is_valid(self, path: str) -> bool:
        """Does the cache entry at ``path`` still hold its hash's bytes (stat record, else re-hash)?"""
        oid = self.entry_oid(path)
        return oid is not None and os.path.isfile(path) and self._validate(path, oid, False) is not None

    def get(
        self,
        store: ArtifactStore,
        kind: ArtifactKind,
        oid: str,
        *,
        full_verify: bool = False,
        callback: Callback | None = None,
        name: str | None = None,
    ) -> CacheGet:
        """Return a local, verified copy of ``oid``, downloading it only if needed. The
        entry stays held (never evicted) until :meth:`release` or this process ends.
        ``name`` (what the user called it) is kept in the entry's record for listings."""
        validate_oid(oid)
        path = self.path_for(kind, oid)
        t0 = time.perf_counter()
        if not full_verify and os.path.exists(path):
            # A hit takes no entry lock: the hold keeps evictions off, the stat check
            # covers a replace racing it (a mismatch falls through to the locked path).
            try:
                self._holds.hold(path)
                st = os.stat(path)
            except FileNotFoundError:  # evicted meanwhile: fetched again below
                st = None
            if st is not None and self._read_record(path) == file_version(st):
                cache_lru.touch(path)
                return CacheGet(path, oid, st.st_size, True, "stat", time.perf_counter() - t0)
        size = opened = None
        try:
            if not os.path.exists(path):
                # Before anything is created here: a hash nobody has, or one this disk cannot
                # hold. Where the backend can, the download's own first request says so (no
                # request for the size alone); it is read from once the entry is locked. Not
                # when an earlier get left a partial: the bytes from 0 would come in for nothing.
                if not _has_bytes(self.partial_path(kind, oid)):
                    opened = store.open_object(kind, oid)
                size = opened.size if opened is not None else store.size_of(kind, oid)
            return self._get_missing(store, kind, oid, path, size, opened, full_verify, callback, name, t0)
        finally:
            if opened is not None:  # not read from (fetched meanwhile by another get, a full disk)
                opened.close()

    def _get_missing(self, store: ArtifactStore, kind: ArtifactKind, oid: str, path: str, size: int | None,
                     opened, full_verify: bool, callback: Callback | None, name: str | None, t0: float) -> CacheGet:
        if size is not None:
            self._check_cap(kind, oid, size)
            ensure_room(self.root, size, f"{kind.name} {oid}")
        with local_write(self.root, size, f"{kind.name} {oid}"):
            os.makedirs(os.path.dirname(path), exist_ok=True)

        def stale() -> None:
            # Another get holds the lock, maybe for a long download: the answer opened before
            # would wait as long. Dropped now (its connection freed); the bytes are asked for again.
            nonlocal opened
            if opened is not None:
                opened.close()
                opened = None

        with _entry_lock(path, stale):
            repaired = False
            if os.path.exists(path):
                how = self._validate(path, oid, full_verify)
                if how:
                    self._holds.hold(path)
                    cache_lru.touch(path)
                    st = os.stat(path)
                    return CacheGet(path, oid, st.st_size, True, how, time.perf_counter() - t0)
                repaired = True
                self._evict(path)
            size = store.size_of(kind, oid) if size is None else size
            self._check_cap(kind, oid, size)
            if self.max_size is not None:  # room first, so the cap holds during the download too
                cache_lru.prune(self.root, self.max_size - size, runs_dir=self.runs_dir, keep_runs=self.keep_runs)
            got = self._download(store, kind, oid, path, size, callback, opened)
            self._holds.hold(path)
            if name:
                self._write_record(path, os.stat(path), name=name)
        if self.max_size is not None:
            cache_lru.prune(self.root, self.max_size, runs_dir=self.runs_dir, keep_runs=self.keep_runs)
        return CacheGet(path, oid, got.size, False, "download", time.perf_counter() - t0, repaired,
                        got.resumed_from, got.reconnects)

    def _check_cap(self, kind: ArtifactKind, oid: str, size: int) -> None:
        if self.max_size is not None and size > self.max_size:
            raise OutputError(f"{kind.name} {oid} is {size} bytes ({human(size)}), more than the whole cache may "
                              f"hold (cache.max_size={self.max_size} bytes, {human(self.max_size)}); nothing was "
                              f"downloaded: raise cache.max_size or give another cache_dir")

    def partial_path(self, kind: ArtifactKind, oid: str) -> str:
        """Where an unfinished download of ``oid`` keeps its bytes (only under the lock)."""
        return os.path.join(self.root, kind.folder, f".{oid}.partial")

    def _validate(self, path: str, oid: str, full_verify: bool) -> str | None:
        """``stat`` or ``rehash`` when the entry is good, None when it is corrupt."""
        st = os.stat(path)
        if not full_verify and self._read_record(path) == file_version(st):
            return "stat"
        if hash_file(path).blake3 != oid:
            return None
        self._write_record(path, os.stat(path))
        return "rehash"

    def _download(self, store: ArtifactStore, kind: ArtifactKind, oid: str, path: str, size: int,
                  callback: Callback | None, opened=None) -> _Fetched:
        from fsspec.callbacks import DEFAULT_CALLBACK

        callback = callback or DEFAULT_CALLBACK
        what = f"{kind.name} {oid}"
        if not store.backend.local_paths:
            return self._fetch_resumable(store, kind, oid, path, size, callback, opened)
        ensure_room(self.root, size, what)  # again: a corrupt entry may just have been evicted
        try:
            source = open(store.object_path(kind, oid), "rb")
        except FileNotFoundError:
            from .store import removed_while_fetched  # imported already, by whoever made the store

            raise removed_while_fetched(store.backend, what) from None
        tmp = None
        try:
            with source, local_write(os.path.dirname(path), size, what):
                tmp = temp_name(os.path.dirname(path), f".{oid[:16]}.")  # named first: always removable
                fd = create_temp_at(tmp)
                # Same machine: a copy-on-write clone where the filesystem has them (btrfs,
                # XFS), else the kernel's copy. Never a hard link: editing the cache entry
                # would then corrupt the store. The result itself is hashed (mmap + threads).
                _clone_or_copy(source, fd)
                got = hash_file(tmp)
                callback.relative_update(got.size)
            self._publish(tmp, path, got.blake3, oid, size, store, kind)
            return _Fetched(got.size)
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise

    def _fetch_resumable(self, store: ArtifactStore, kind: ArtifactKind, oid: str, path: str, size: int,
                         callback: Callback, opened=None) -> _Fetched:
        """Download into the kept partial, continuing from what an earlier get left.
        ``opened``: the read :meth:`get` started from byte 0, used if nothing is kept."""
        partial = self.partial_path(kind, oid)
        what = f"{kind.name} {oid}"
        while True:
            kept = _kept_bytes(partial, size)
            start, opened = opened, None
            if kept and start is not None:  # it reads from byte 0: dropped now, its connection freed
                start.close()
                start = None
            ensure_room(self.root, size - kept, what)  # again: a corrupt entry may just have been evicted
            try:
                got, reconnects = self._stream_into(partial, kept, store, kind, oid, size, callback, start)
                self._publish(partial, path, got.blake3, oid, size, store, kind)
                return _Fetched(got.size, kept, reconnects)
            except IntegrityError:
                _unlink(partial)
                if kept:  # the kept prefix may be what was wrong: once more, from zero
                    callback.relative_update(-size)
                    continue
                raise
            except (OutputError, ArtifactNotFound):
                # A full disk leaves no partial file (a promise), nor does a hash that is gone.
                # Anything else (a backend that gave up, Ctrl-C, SIGKILL) keeps the bytes for
                # the next get: they are checked with the rest by the final hash.
                _unlink(partial)
                raise

    def _publish(self, tmp: str, path: str, blake3: str, oid: str, size: int, store: ArtifactStore,
                 kind: ArtifactKind) -> None:
        if blake3 != oid:
            raise IntegrityError(
                f"download of {kind.name} {oid} from {store.backend.location} hashed to {blake3}; discarded"
            )
        with local_write(path, size, f"{kind.name} {oid}"):
            os.chmod(tmp, 0o444)  # cache entries are read-only: edits would break the address
            os.replace(tmp, path)
            self._write_record(path, os.stat(path))

    def _stream_into(self, partial: str, kept: int, store: ArtifactStore, kind: ArtifactKind, oid: str,
                     size: int, callback: Callback, opened=None):
        hasher = StreamHasher()
        what = f"{kind.name} {oid}"
        reconnects = 0

        def resumed(_at: int) -> None:
            nonlocal reconnects
            reconnects += 1

        with local_write(os.path.dirname(partial), size, what):
            fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd, "r+b") as out:
            if kept:
                _hash_prefix(out.fileno(), kept, hasher)
                callback.relative_update(kept)
            with local_write(partial, size, what):
                # A torn last write beyond what was counted goes. Only then: ext4 flushes a
                # file truncated to 0 (a new one too) in full when it is closed.
                if os.fstat(out.fileno()).st_size > kept:
                    out.truncate(kept)
                out.seek(kept)

            def sink(chunk: bytes) -> None:
                # Written, then hashed, in this thread as each chunk arrives: the partial
                # file holds what was hashed, a prefix, in order (a failed write ends the
                # get before its chunk is hashed). Handing both to threads of their own
                # measured slower on 2 cores (256 MiB from the filer: 500 ms against 446,
                # CPU 479 against 358; the queued chunks cost 20,000 page faults), as the
                # kernel already receives the next bytes meanwhile and BLAKE3 has its threads.
                # Inside the backend's error mapping: a full local disk must be reported
                # as what it is, not as the backend failing.
                with local_write(self.root, size, what):
                    out.write(chunk)
                hasher.update(chunk)
                callback.relative_update(len(chunk))

            try:
                store.stream_object(store.object_path(kind, oid), sink, offset=kept, on_resume=resumed,
                                    opened=opened)
            except FileNotFoundError:
                from .store import removed_while_fetched

                raise removed_while_fetched(store.backend, what) from None
            finally:  # what was written and hashed, on disk before the partial is kept or published
                with local_write(self.root, size, what):
                    out.flush()
        return hasher.digest(), reconnects

    def _evict(self, path: str) -> None:
        for p in (path, path + ".verified"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    def _read_record(self, path: str):
        try:
            with open(path + ".verified", "rb") as f:
                return orjson.loads(f.read()).get("stat")
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None

    def _write_record(self, path: str, st: os.stat_result, name: str | None = None) -> None:
        """Best effort: without a record (a full disk, say) the next hit re-hashes."""
        record = {"stat": file_version(st), "verified_at": utc_now(), "algorithm": "BLAKE3"}
        if name is None:
            name = cache_lru.recorded_name(path)  # a re-verified entry keeps what it was called
        if name:
            record["name"] = name
        data = orjson.dumps(record)
        tmp = f"{path}.verified.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path + ".verified")
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@dataclass
class _Fetched:
    size: int
    resumed_from: int = 0
    reconnects: int = 0


def _kept_bytes(partial: str, size: int) -> int:
    """Bytes an earlier get left in ``partial`` that may be kept (0: start afresh)."""
    try:
        kept = os.path.getsize(partial)
    except FileNotFoundError:
        return 0
    if kept > size:  # not a prefix of this object
        _unlink(partial)
        return 0
    return kept


def _has_bytes(path: str) -> bool:
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


def _hash_prefix(fd: int, length: int, hasher: StreamHasher) -> None:
    """Feed the first ``length`` bytes of ``fd`` to ``hasher``, a window at a time (mmap:
    blake3's threads get large inputs, memory stays bounded)."""
    for off in range(0, length, WINDOW):
        n = min(WINDOW, length - off)
        with mmap.mmap(fd, n, offset=off, access=mmap.ACCESS_READ) as mm:
            hasher.update(mm)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


@contextlib.contextmanager
def _entry_lock(path: str, on_wait) -> Iterator[None]:
    """Hold the entry's lock (see the top); ``on_wait()`` is called first if another
    get holds it."""
    from filelock import FileLock, Timeout  # a hit takes no lock

    lock = FileLock(path + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _clone_or_copy(s, dst_fd: int) -> None:
    """Fill the open file ``dst_fd`` from the open file ``s``: reflink if possible, else
    copy; closes dst_fd."""
    with os.fdopen(dst_fd, "wb") as d:
        try:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
            return
        except OSError:
            pass
        try:  # in-kernel copy, no bytes through Python
            while os.copy_file_range(s.fileno(), d.fileno(), 1 << 30):
                pass
        except OSError:
            d.seek(0)
            d.truncate()
            s.seek(0)
            shutil.copyfileobj(s, d, 8 * 1024 * 1024)


