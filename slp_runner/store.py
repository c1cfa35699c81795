"""The content-addressed artifact store, over any :class:`~slp_runner.backends.Backend`.

Invariant: nothing is ever visible under ``<kind>/<hash>`` whose bytes do not hash
to ``<hash>``. Where the backend hashes what it sends (``Backend.verified_upload``:
the filer, S3), the file is hashed again as it streams out and published only if
the bytes sent hash right: the filer renames from ``.incoming/``, S3 completes a
multipart upload written in place. Elsewhere (local, or ``verify_upload="rehash"``)
it goes to ``.incoming/`` under a unique name, is checked (size, or a full re-read
and re-hash), and only then renamed into place. Manifests follow the same way, or
in one all-or-nothing PUT, always after their object. Readers never see a partial
object.

On the filer a large file is sent to ``.incoming/`` at once, hashed as it goes out,
and renamed under the hash of the bytes sent unless a sound object is stored under it
already (then the upload is dropped). Where the filer runs on another machine, a second
thread also hashes the file and looks the hash up meanwhile (reading a file is many
times faster than sending it): a stored object then cuts the upload short. Where it
runs on this one, that second read would take a core from the filer, so only a hash
this machine remembers for the file (:mod:`~slp_runner.hash_memo`) is looked up early.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from . import manifest as manifests
from .artifacts import KINDS, MODEL, PROMPTS, ArtifactKind
from .backends import Backend
from .errors import ArtifactNotFound, BackendError, ConfigError, InputError, IntegrityError, SlpError
from .hash_memo import HashMemo
from .hashing import STREAM_CHUNK, FileDigest, StreamHasher, file_version, hash_file, validate_oid
from .jsonl import count_prompt_records
from .redaction import mask_names

VERIFY_MODES = ("size", "rehash")
# How a put checks an object already stored under the hash before deduplicating
# against it: ``size`` (one metadata request) or ``hash`` (re-read and re-hash it).
EXISTING_CHECKS = ("size", "hash")
INCOMING = ".incoming"
# Files from this size on are sent while they are hashed, where the backend allows it
# (ArtifactStore.put). Below it hashing and the lookup take a few ms at most.
AHEAD_MIN = 8 * 1024 * 1024
# Whether such a put also hashes the file in a second read beside the upload, so that an
# object already stored stops it early (ArtifactStore.put): auto = unless the filer runs
# on this machine, where that read takes a core from the filer.
HASH_AHEAD = ("auto", True, False)


@dataclass
class PutResult:
    kind: ArtifactKind
    oid: str
    size: int
    uploaded: bool  # False: the object was already there, sound (deduplicated)
    seconds: float  # upload time (0 when deduplicated)
    hash_seconds: float
    verification: str
    manifest: dict[str, Any]
    object_path: str
    sha256: str | None = None
    repaired: str | None = None  # why a damaged stored object was replaced (None: it was not)
    manifest_rewritten: bool = False  # deduplicated, but the manifest was missing or damaged
    sent_anyway: bool = False  # deduplicated only once the file was sent (hashed as it went out): dropped
    ref: str | None = None  # name:tag the put was given (written by commands.put, not the store)

    @property
    def mib_per_s(self) -> float:
        return self.size / (1024 * 1024) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ObjectCheck:
    kind: ArtifactKind
    oid: str
    ok: bool
    detail: str
    size: int = 0


@dataclass
class _Put:
    """One put's file and what its manifest will say, as the steps after hashing need them."""

    local_path: str
    kind: ArtifactKind
    before: os.stat_result  # the file as the put found it: a change meanwhile publishes nothing
    callback: Callback
    manifest_args: dict[str, Any]  # name, source, provenance, tool, metadata


@dataclass
class _Found:
    """What the store holds under a hash."""

    present: bool  # an object is there
    damage: str | None  # why it (or its absence beside a manifest) needs a repair; None: it does not
    manifest: dict[str, Any] | None  # its sound manifest, None if missing or damaged

    @property
    def sound(self) -> bool:
        return self.present and self.damage is None


class _Unwanted(Exception):
    """Stops an upload started ahead of its hash: a sound object is stored under the
    hash already, or hashing or the lookup failed (the lookahead has the error)."""


class _Lookahead:
    """Hash a local file and look up what the store holds under the hash, in a thread of
    its own, while the upload this may make pointless goes on in the caller's thread.
    With a ``hint`` (the hash a :class:`~slp_runner.hash_memo.HashMemo` remembers for
    the file), that hash is looked up at once and the file is not read: what is found
    then stops the upload only; the caller hashes the file before it deduplicates.

    Only the caller's thread writes to the backend: this one reads (the file, the
    object's metadata, its manifest), so leaving it behind, as an interrupt does, leaves
    nothing on the backend. ``cancel`` stops the hashing at its next window."""

    def __init__(self, store: ArtifactStore, job: _Put, how: str, sha256: bool, expect_oid: str | None,
                 hint: str | None = None):
        self._store, self._job, self._how, self._sha256, self._expect = store, job, how, sha256, expect_oid
        self.hint = hint
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self.digest: FileDigest | None = None  # the file's, once hashed (never with a hint)
        self.oid: str | None = None  # the hash looked up: the digest's, or the hint
        self.found: _Found | None = None
        self.error: BaseException | None = None
        self.hash_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="slp-put-lookahead", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()

    def _run(self) -> None:
        store, job = self._store, self._job
        try:
            if self.hint is not None:
                looked_up = FileDigest(self.hint, job.before.st_size)
            else:
                t0 = time.perf_counter()
                # One thread: the upload beside it, and the filer it sends to, want the other core.
                looked_up = hash_file(job.local_path, sha256=self._sha256, stop=self._cancelled.is_set, threads=1)
                self.hash_seconds = time.perf_counter() - t0
                self.digest = looked_up
                _check_expected(job.local_path, looked_up, self._expect)
            self.oid = looked_up.blake3
            final = store.object_path(job.kind, looked_up.blake3)
            try:
                with backend_errors(store.backend, f"storing {final}"):
                    self.found = store._lookup(job.kind, looked_up, final, self._how)
            except Exception:
                if self.hint is None:
                    raise
                self.found = None  # a hint only: the put looks its own hash up once it is sent
        except BaseException as exc:  # raised again by raise_error(), in the caller's thread
            self.error = exc
        finally:
            self._done.set()

    def stops_upload(self) -> bool:
        """The upload is pointless: a sound object is stored, or this failed."""
        return self._done.is_set() and (self.error is not None or (self.found is not None and self.found.sound))

    def wait(self) -> None:
        self._done.wait()

    def raise_error(self) -> None:
        """Raise, in the caller's thread, what this thread failed with (if it did)."""
        self._done.wait()
        if self.error is not None:
            raise self.error


@dataclass
class _Sent:
    """What a put that uploads ahead of its hash knows: the file's digest (the lookahead's,
    or that of the bytes sent) and what is stored under it."""

    digest: FileDigest | None = None
    found: _Found | None = None
    whole: bool = False  # the file was sent whole before the stored object was found


def check_local_file(local_path: str) -> None:
    """InputError unless ``local_path`` is a regular file (what a put can store)."""
    if not os.path.exists(local_path):
        raise InputError(f"{local_path}: no such file")
    if not os.path.isfile(local_path):
        raise InputError(f"{local_path}: not a regular file")


def _check_expected(local_path: str, digest: FileDigest, expect_oid: str | None) -> None:
    if expect_oid is not None and digest.blake3 != expect_oid:
        raise InputError(f"{local_path} hashes to {digest.blake3}, not {expect_oid}: it cannot stand for that object")


def _late_destination(backend: Backend) -> bool:
    """The backend's verified upload goes to a temporary name and can be told where it
    goes (and stopped) while it runs: the filer's. Said by the upload function itself
    (``late_destination``) for want of a Backend field."""
    upload = backend.verified_upload
    return bool(getattr(getattr(upload, "func", upload), "late_destination", False))


def _in_background(fn: Callable[[], Any]) -> Future:
    """Run ``fn`` in a daemon thread; its result (or error) comes from the Future."""
    fut: Future = Future()

    def run() -> None:
        fut.set_running_or_notify_cancel()
        try:
            fut.set_result(fn())
        except BaseException as exc:
            fut.set_exception(exc)

    threading.Thread(target=run, name="slp-store-bg", daemon=True).start()
    return fut


@contextlib.contextmanager
def backend_errors(backend: Backend, what: str | Callable[[], str]) -> Iterator[None]:
    """Turn whatever a backend raises into one SlpError line naming the backend and
    ``what`` was being done (a callable: asked only if there is an error to name)."""
    t0 = time.monotonic()

    def tried(exc: BaseException) -> str:
        # A backend that counted its attempts (the filer's retries) says how hard it tried;
        # otherwise its configured bound (botocore counts but does not say) and the time.
        if getattr(exc, "attempts", 0) and getattr(exc, "seconds", None) is not None:
            return f" after {exc.attempts} attempts over {exc.seconds:.1f} s"
        if backend.resumes:
            return f" after up to {backend.resumes + 1} attempts over {time.monotonic() - t0:.1f} s"
        return ""

    try:
        yield
    except SlpError:
        raise
    except FileNotFoundError:
        raise
    except (ConnectionError, TimeoutError) as exc:
        how = "timed out" if isinstance(exc, TimeoutError) else "unreachable"
        raise BackendError(f"{backend.name} backend {how} at {backend.location}{tried(exc)} ({_said(what)})") from exc
    except PermissionError as exc:  # S3's 403 (a HEAD's says only "Forbidden"), a filer's 401/403
        msg = str(exc).splitlines()[0] if str(exc) else "access denied"
        raise BackendError(f"{backend.name} backend at {backend.location} refused access ({_said(what)}): {msg}; "
                           f"check the credentials it is given") from exc
    except Exception as exc:  # botocore, aiohttp and requests errors are not all OSErrors
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if _no_credentials(exc):
            raise BackendError(f"{backend.name} backend at {backend.location} has no credentials ({_said(what)}): "
                               f"{msg}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an AWS profile "
                               f"(~/.aws/credentials)") from exc
        if "connect" in msg.lower() or "endpoint" in msg.lower():
            raise BackendError(f"{backend.name} backend unreachable at {backend.location}{tried(exc)} "
                               f"({_said(what)})") from exc
        raise BackendError(f"{backend.name} backend at {backend.location}: {_said(what)} failed: {msg}") from exc


def _no_credentials(exc: BaseException) -> bool:
    """botocore found no credentials (or half of them); botocore is not imported for it."""
    errors = sys.modules.get("botocore.exceptions")
    return errors is not None and isinstance(exc, (errors.NoCredentialsError, errors.PartialCredentialsError))


def _said(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


def removed_while_fetched(backend: Backend, what: str) -> ArtifactNotFound:
    """An object found a moment ago (its kind, its size) and gone when read: a gc, a user's rm."""
    return ArtifactNotFound(f"{what} is no longer in {backend.name} backend at {backend.location}: "
                            f"it was removed while it was being fetched")


class _FileRead:
    """A read through ``fs.open`` from byte ``offset``, where the backend has no reader
    of its own (``Backend.open_reader``): what ``stream_object`` streams from."""

    def __init__(self, fs: Any, path: str, offset: int):
        self._f = fs.open(path, "rb")
        try:
            if offset:
                self._f.seek(offset)
        except BaseException:
            self._f.close()
            raise

    def stream(self, sink: Callable[[bytes], None]) -> None:
        while chunk := self._f.read(STREAM_CHUNK):
            sink(chunk)

    def __enter__(self) -> _FileRead:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


class ArtifactStore:
    """Put and read artifacts by BLAKE3 hash on one backend.

    verify_upload: ``size`` compares the stored size with the local file's (and
    that the local file did not change while it was sent; where the backend hashes
    what it sends, the sent bytes are hashed instead: ``inline-hash``); ``rehash``
    reads the stored object back and hashes it before it is published.
    """

    def __init__(self, backend: Backend, verify_upload: str = "size", verify_existing: str = "size",
                 hash_ahead: bool | str = "auto", hash_memo: HashMemo | None = None):
        if isinstance(hash_ahead, str) and hash_ahead.lower() in ("true", "false"):  # quoted, or from the environment
            hash_ahead = hash_ahead.lower() == "true"
        if hash_ahead not in HASH_AHEAD:
            raise ConfigError(f"unknown hash_ahead {hash_ahead!r} (choose from auto, true, false)")
        if verify_upload not in VERIFY_MODES:
            raise ConfigError(f"unknown upload verification {verify_upload!r} (choose from {', '.join(VERIFY_MODES)})")
        if verify_existing not in EXISTING_CHECKS:
            raise ConfigError(f"unknown verify_existing {verify_existing!r} (choose from {', '.join(EXISTING_CHECKS)})")
        self.backend = backend
        self.fs = backend.fs
        self.verify_upload = verify_upload
        self.verify_existing = verify_existing
        self.hash_ahead = hash_ahead
        self.hash_memo = hash_memo
        # Sizes of objects ``find_kind`` just found, for the next ``size_of`` of each (a
        # get by hash alone then asks once, not twice); used once, so a later check asks
        # the backend again. An object's size is its hash's: a damaged one is caught by
        # the hash of what is read, whatever size was expected.
        self._found_sizes: dict[str, int] = {}

    # -- addressing ---------------------------------------------------------------

    def object_path(self, kind: ArtifactKind, oid: str) -> str:
        return self.backend.path(kind.object_name(oid))

    def manifest_path(self, kind: ArtifactKind, oid: str) -> str:
        return self.backend.path(kind.manifest_name(oid))

    def exists(self, kind: ArtifactKind, oid: str) -> bool:
        path = self.object_path(kind, oid)
        with backend_errors(self.backend, f"checking {path}"):
            return self.fs.exists(path)

    def find_kind(self, oid: str) -> ArtifactKind:
        """The kind under which ``oid`` is stored; ArtifactNotFound if under none."""
        validate_oid(oid)
        kinds = list(KINDS.values())
        objects = [self.object_path(kind, oid) for kind in kinds]
        for kind, path, info in zip(kinds, objects, self._info_all(objects, f"looking up hash {oid}")):
            if info is not None:
                if info.get("type") == "file":
                    self._found_sizes[path] = int(info["size"])
                return kind
        # The object may be lost while its manifest is not (repair): its kind is the manifest's.
        for kind, info in zip(kinds, self._info_all([self.manifest_path(kind, oid) for kind in kinds],
                                                    f"looking up hash {oid}")):
            if info is not None:
                return kind
        raise ArtifactNotFound(f"no artifact with hash {oid} in {self.backend.name} backend at {self.backend.location}")

    def _info_all(self, paths: list[str], what: str) -> list[dict | None]:
        """What is at each path (``fs.info``), None where nothing is. On a remote backend
        the requests go out at once (the latency of one, not of each: a get by hash alone
        probes every kind's folder); locally a stat is quicker than a thread. ``what``:
        what an error says was being done."""
        def info(path: str) -> dict | None:
            with backend_errors(self.backend, what):
                if self.backend.file_info is not None:
                    return self.backend.file_info(path)
                try:
                    return self.fs.info(path)
                except FileNotFoundError:
                    return None

        if self.backend.local_paths:
            return [info(path) for path in paths]
        later = [_in_background(lambda path=path: info(path)) for path in paths[1:]]
        return [info(paths[0])] + [answer.result() for answer in later]

    def require(self, kind: ArtifactKind, oid: str) -> None:
        self.size_of(kind, oid)

    def size_of(self, kind: ArtifactKind, oid: str) -> int:
        """The stored object's size in bytes; ArtifactNotFound if it is not there."""
        path = self.object_path(kind, oid)
        if (found := self._found_sizes.pop(path, None)) is not None:
            return found
        with backend_errors(self.backend, f"checking {path}"):
            try:
                return int(self.fs.info(path)["size"])
            except FileNotFoundError:
                raise ArtifactNotFound(
                    f"no {kind.name} with hash {oid} in {self.backend.name} backend at {self.backend.location}"
                ) from None

    # -- writing ------------------------------------------------------------------

    def put(
        self,
        local_path: str,
        kind: ArtifactKind,
        *,
        name: str | None = None,
        source: str | None = None,
        provenance: dict[str, Any] | None = None,
        sha256: bool = False,
        tool: str = "slp put",
        callback: Callback = DEFAULT_CALLBACK,
        verify_existing: str | None = None,
        expect_oid: str | None = None,
    ) -> PutResult:
        """Store a local file under its hash, with a manifest.

        An object already stored under the hash is checked first (its size, or with
        ``verify_existing="hash"`` its bytes): a sound one is not uploaded again
        (deduplicated); a damaged one is replaced through the same atomic path as a
        new upload, and ``PutResult.repaired`` says why. ``expect_oid``: refuse a
        file that does not hash to it (``repair``); nothing is published then.

        Where the backend uploads to a temporary name and is told the final one only
        once the bytes are sent (the filer), a large file's upload starts at once and
        the bytes are hashed as they go out: they are published under that hash, or
        dropped if a sound object is stored under it. With ``hash_ahead`` (``auto``:
        unless the filer runs on this machine), a thread also hashes the file and looks
        the hash up meanwhile, so a sound stored object stops the upload part-way; a
        hash the ``hash_memo`` remembers for the file is looked up at once instead
        (then the file is hashed before it is deduplicated). Nothing is kept of a
        stopped upload. Elsewhere the file is hashed first.
        """
        local_path = os.fspath(local_path)
        check_local_file(local_path)
        how = verify_existing or self.verify_existing
        if how not in EXISTING_CHECKS:  # the constructor checked the default; this is a per-call choice
            raise ConfigError(f"unknown verify_existing {how!r} (choose from {', '.join(EXISTING_CHECKS)})")
        metadata = self._inspect(local_path, kind)
        job = _Put(local_path, kind, os.stat(local_path), callback,
                   dict(name=name, source=source, provenance=provenance, tool=tool, metadata=metadata))
        buffer = self._read_whole(job)
        if buffer is None and self._uploads_ahead(job, how):
            return self._put_ahead(job, how, sha256, expect_oid)

        # A first write may have to connect and make a bucket: done while the file is hashed.
        prepare = _in_background(self.backend.ensure_writable) if self.backend.prepare_write is not None else None
        t0 = time.perf_counter()
        if buffer is not None:
            hasher = StreamHasher(sha256=sha256)
            hasher.update(buffer)
            digest = hasher.digest()
        else:
            digest = hash_file(local_path, sha256=sha256)
        hash_seconds = time.perf_counter() - t0
        _check_expected(local_path, digest, expect_oid)
        final = self.object_path(kind, digest.blake3)
        if buffer is not None:  # its checksum, say, computed while the hash is looked up
            sender = _in_background(lambda: self._prepare_put(final, buffer))
        with backend_errors(self.backend, f"storing {final}"):
            found = self._lookup(kind, digest, final, how)
            if prepare is not None:
                prepare.result()
            if found.sound and (done := self._deduplicate(job, digest, found, hash_seconds)) is not None:
                return done
            t1 = time.perf_counter()
            if buffer is not None:  # the very bytes hashed, in one all-or-nothing PUT
                callback.set_size(len(buffer))
                sender.result()()
                callback.relative_update(len(buffer))
                verification = "inline-hash"
            elif self.backend.verified_upload is not None and self.verify_upload == "size":
                verification = self._write_verified(local_path, final, digest, job.before, callback)
            else:
                verification = self._write_then_rename(local_path, final, digest, job.before, callback)
            return self._publish_new(job, digest, found, verification, time.perf_counter() - t1, hash_seconds)

    def _read_whole(self, job: _Put) -> bytes | None:
        """The file's bytes, where it is small enough to be read once, hashed in memory
        and sent from that same buffer in one all-or-nothing PUT (``atomic_put``): one
        read and one hash instead of two, and no temporary name to rename. None where
        not (``Backend.buffered_put_max``), or with ``verify_upload="rehash"``."""
        if (self.verify_upload != "size" or not self.backend.atomic_put
                or job.before.st_size > self.backend.buffered_put_max):
            return None
        with open(job.local_path, "rb") as f:
            buffer = f.read(self.backend.buffered_put_max + 1)
        # What was read is what is hashed and sent; it must also be the file the put
        # found (its manifest names it), not a mix of two versions.
        self._check_unchanged(job.local_path, job.before)
        if len(buffer) != job.before.st_size:
            raise IntegrityError(f"{job.local_path} changed while it was being stored; nothing was published")
        return buffer

    def _prepare_put(self, path: str, data: bytes) -> Callable[[], None]:
        if self.backend.prepare_put is not None:
            return self.backend.prepare_put(path, data)
        return functools.partial(self.fs.pipe_file, path, data)

    def _uploads_ahead(self, job: _Put, how: str) -> bool:
        """Whether this put starts its upload before the hash is known (see ``put``).

        Only worth it where reading the file takes a while: below ``AHEAD_MIN`` the
        hash and the lookup take a few ms, and a deduplicated put would send most of
        the file before it could be stopped. Not with ``rehash`` or ``hash`` checks,
        which read the stored bytes back anyway."""
        return (self.verify_upload == "size" and how == "size" and job.before.st_size >= AHEAD_MIN
                and _late_destination(self.backend))

    def _hashes_ahead(self, sha256: bool) -> bool:
        """Whether a filer put hashes its file in a second read beside the upload (see ``put``)."""
        if sha256:  # the bytes sent are hashed with BLAKE3 alone
            return True
        if self.hash_ahead == "auto":
            return not self.backend.same_machine
        return bool(self.hash_ahead)

    def _put_ahead(self, job: _Put, how: str, sha256: bool, expect_oid: str | None) -> PutResult:
        hint = self.hash_memo.recall(job.before) if self.hash_memo is not None and not sha256 else None
        look = None
        if hint is not None or self._hashes_ahead(sha256):
            look = _Lookahead(self, job, how, sha256, expect_oid, hint=hint)
            look.start()
        sent = _Sent()
        try:
            seconds = self._send_ahead(job, look, sent, how, expect_oid)
            if look is not None and look.stops_upload():
                look.raise_error()  # hashing, the expected hash or the lookup failed, if it stopped for that
        except BaseException:
            if look is not None:
                look.cancel()
            raise
        hash_seconds = look.hash_seconds if look is not None else 0.0
        if seconds is not None:
            result = self._publish_new(job, sent.digest, sent.found, "inline-hash", seconds, hash_seconds)
        elif sent.digest is not None:  # the bytes sent (or the lookahead's) hash to a sound stored object
            result = self._store_known(job, sent.digest, sent.found, hash_seconds, how)
            result.sent_anyway = sent.whole and not result.uploaded
        else:  # a remembered hash found a sound object: the file must hash to it to be that object
            t0 = time.perf_counter()
            digest = hash_file(job.local_path)
            _check_expected(job.local_path, digest, expect_oid)
            found = look.found if digest.blake3 == look.oid else None
            result = self._store_known(job, digest, found, time.perf_counter() - t0, how)
        self._remember(job, result.oid)
        return result

    def _store_known(self, job: _Put, digest: FileDigest, found: _Found | None, hash_seconds: float,
                     how: str) -> PutResult:
        """Store a file whose hash is known: keep the sound object found under it (None:
        look it up), or send the file (again) and publish it."""
        final = self.object_path(job.kind, digest.blake3)
        with backend_errors(self.backend, f"storing {final}"):
            if found is None:
                found = self._lookup(job.kind, digest, final, how)
            self._check_unchanged(job.local_path, job.before)  # the file hashed is the file the put found
            if found.sound and (done := self._deduplicate(job, digest, found, hash_seconds)) is not None:
                return done
            t1 = time.perf_counter()  # not stored, or a gc removed it meanwhile: send the file
            verification = self._write_verified(job.local_path, final, digest, job.before, job.callback)
            return self._publish_new(job, digest, found, verification, time.perf_counter() - t1, hash_seconds)

    def _remember(self, job: _Put, oid: str) -> None:
        """Tell the memo what the file hashed to, if it is still the file the put found."""
        if self.hash_memo is None:
            return
        with contextlib.suppress(OSError):
            if file_version(os.stat(job.local_path)) == file_version(job.before):
                self.hash_memo.remember(job.before, oid)

    def _send_ahead(self, job: _Put, look: _Lookahead | None, sent: _Sent, how: str,
                    expect_oid: str | None) -> float | None:
        """Upload to a temporary name, hashing the bytes as they go, while ``look`` (if
        any) hashes the file or looks a remembered hash up; publish under the hash of the
        bytes sent unless a sound object is stored under it. Fills ``sent`` with the
        file's digest and what is stored under it. The seconds it took, or None if it
        was stopped (by ``look``) or dropped (a sound object is stored under the sent
        bytes' hash): nothing is left of it then."""

        def proceed() -> None:  # before each block sent
            if look is not None and look.stops_upload():
                raise _Unwanted

        def check(digest: FileDigest) -> None:  # once all was sent, before the rename
            if look is not None:
                look.wait()
                if look.stops_upload():
                    if look.hint is not None and look.oid == digest.blake3:  # found only after the last byte
                        sent.digest, sent.found, sent.whole = digest, look.found, True
                    raise _Unwanted
                if look.digest is not None and digest.blake3 != look.digest.blake3:
                    raise IntegrityError(f"{job.local_path} changed while it was being stored; nothing was published")
            self._check_unchanged(job.local_path, job.before)
            _check_expected(job.local_path, digest, expect_oid)
            # The lookahead's digest where it hashed the file: the same BLAKE3, and its sha256 if asked.
            sent.digest = look.digest if look is not None and look.digest is not None else digest
            if look is not None and look.oid == digest.blake3 and look.found is not None:
                sent.found = look.found
            else:  # looked up only now: no lookahead, or a remembered hash that is stale
                sent.found = self._lookup(job.kind, digest, self.object_path(job.kind, digest.blake3), how)
            if sent.found.sound:
                sent.whole = True
                raise _Unwanted

        def storing() -> str:
            digest = sent.digest or (look.digest if look is not None else None)
            return f"storing {self.object_path(job.kind, digest.blake3) if digest else job.local_path}"

        with backend_errors(self.backend, storing):
            self.backend.ensure_writable()
            t1 = time.perf_counter()
            try:
                self.backend.verified_upload(job.local_path, lambda: self.object_path(job.kind, sent.digest.blake3),
                                             check, callback=job.callback,
                                             incoming=self.backend.path(INCOMING, f"{uuid.uuid4().hex}.part"),
                                             proceed=proceed)
            except _Unwanted:
                if sent.digest is None and look is not None and look.digest is not None:
                    sent.digest, sent.found = look.digest, look.found  # stopped by the lookahead's hash
                return None
            return time.perf_counter() - t1

    def _lookup(self, kind: ArtifactKind, digest: FileDigest, final: str, how: str) -> _Found:
        """What is stored under the hash: the object, checked ``how``, and its manifest,
        asked for at the same time (the latency of one request, not two)."""
        manifest = _in_background(lambda: self._sound_manifest_or_none(kind, digest.blake3))
        present, damage = self._check_existing(final, digest, how)
        found = _Found(present, damage, manifest.result())
        if not present and found.manifest is not None:
            found.damage = "the object was missing, its manifest was not"
        return found

    def _deduplicate(self, job: _Put, digest: FileDigest, found: _Found, hash_seconds: float) -> PutResult | None:
        """Keep the sound object stored under the hash; None if a gc removed it meanwhile."""
        final = self.object_path(job.kind, digest.blake3)
        existing = found.manifest
        rewritten = existing is None  # an earlier put stopped between object and manifest, or it was damaged
        if rewritten:
            existing = self._new_manifest(job.kind, digest, job.local_path, **job.manifest_args, verification="existing")
        # Published again even when sound: its new time tells a gc (slp_runner.gc) that listed
        # this object as old and unreferenced to keep it, as gc re-checks just before deleting.
        self._publish_bytes(manifests.dumps(existing), self.manifest_path(job.kind, digest.blake3))
        if self.fs.exists(final):  # still there after the refresh: a gc re-checking sees the new time
            return PutResult(job.kind, digest.blake3, digest.size, False, 0.0, hash_seconds, "existing", existing,
                             final, digest.sha256, manifest_rewritten=rewritten)
        return None  # a gc deleted it meanwhile: store it again, as a new object

    def _publish_new(self, job: _Put, digest: FileDigest, found: _Found, verification: str, seconds: float,
                     hash_seconds: float) -> PutResult:
        """Write the manifest of an object just stored (after it: a gc never sees a manifest
        whose object is still to come). A repaired object keeps its sound old manifest."""
        record = found.manifest if found.damage else None
        if record is None:
            record = self._new_manifest(job.kind, digest, job.local_path, **job.manifest_args, verification=verification)
        if found.damage:
            record["integrity"].update(repaired_at=manifests.utc_now(), repair_reason=found.damage,
                                       verification_method=verification)
        self._publish_bytes(manifests.dumps(record), self.manifest_path(job.kind, digest.blake3))
        return PutResult(job.kind, digest.blake3, digest.size, True, seconds, hash_seconds, verification, record,
                         self.object_path(job.kind, digest.blake3), digest.sha256, repaired=found.damage)

    def _check_existing(self, final: str, digest: FileDigest, how: str) -> tuple[bool, str | None]:
        """``(present, damage)`` for the object at ``final``: damage is None when it is
        sound by the chosen check, else a one-line reason."""
        if self.backend.file_info is not None:
            info = self.backend.file_info(final)
            if info is None:
                return False, None
        else:
            try:
                info = self.fs.info(final)
            except FileNotFoundError:
                return False, None
        if info.get("type") == "directory":  # nothing a put may overwrite or move into
            raise IntegrityError(f"{final} is a directory, not a stored object: remove it, then put again")
        size = int(info["size"])
        if size != digest.size:
            return True, f"stored size {size} != {digest.size} bytes"
        if how == "hash":
            got = self._hash_remote(final)
            if got.blake3 != digest.blake3:
                return True, f"stored bytes hash to {got.blake3}"
        return True, None

    def _write_then_rename(self, local_path, final, digest, before, callback) -> str:
        tmp = self._incoming_name(digest.blake3)
        try:
            self.fs.put_file(local_path, tmp, callback=callback, **self.backend.write_options)
            self._check_unchanged(local_path, before)
            verification = self._verify_stored(tmp, digest)
            self.fs.mv(tmp, final)
        except BaseException:
            self._discard(tmp)
            raise
        published = self.fs.info(final)  # what a reader now sees under the hash
        if published.get("type") != "file" or int(published["size"]) != digest.size:
            raise IntegrityError(f"{final} is not the object just stored ({published.get('type')}, "
                                 f"{published.get('size')} bytes) after the rename")
        return verification

    def _write_verified(self, local_path, final, digest, before, callback) -> str:
        """Let the backend send and publish, hashing the bytes it sends: they are made
        visible only if that hash matches, which checks the very bytes that went out
        rather than only their count (and spares S3 the server-side copy a rename costs)."""

        def check(sent: FileDigest) -> None:
            if sent.blake3 != digest.blake3:
                raise IntegrityError(f"{local_path} changed while it was being stored; nothing was published")
            self._check_unchanged(local_path, before)

        self.backend.verified_upload(local_path, final, check, callback=callback,
                                     incoming=self._incoming_name(digest.blake3))
        return "inline-hash"

    def refresh(self, kind: ArtifactKind, oid: str) -> bool:
        """Publish a stored object's manifest again (same bytes, a new time), so that a gc
        running now keeps the object (it re-checks times just before deleting). False if
        the object or its manifest is gone."""
        mpath = self.manifest_path(kind, oid)
        with backend_errors(self.backend, f"refreshing {mpath}"):
            try:
                data = self.fs.cat_file(mpath)
            except FileNotFoundError:
                return False
            self._publish_bytes(data, mpath)
            return self.fs.exists(self.object_path(kind, oid))

    def put_bytes(self, data: bytes, path: str) -> None:
        """Publish small bytes (run files) at ``path`` relative to the backend root, atomically."""
        with backend_errors(self.backend, f"writing {path}"):
            self.backend.ensure_writable()
            self._publish_bytes(data, self.backend.path(path))

    def _inspect(self, local_path: str, kind: ArtifactKind) -> dict[str, Any]:
        if kind is MODEL:
            from .gguf_header import read_gguf_metadata  # gguf and numpy: only to read a header

            return read_gguf_metadata(local_path)
        if kind is PROMPTS:
            return {"record_count": count_prompt_records(local_path)}
        return {}

    def _new_manifest(self, kind, digest, local_path, *, name, source, provenance, tool, metadata, verification):
        # Manifests are shared through the backend: a field named like a credential
        # (+provenance.token=...) is recorded as *** (what a run folder shows too).
        prov = mask_names(dict(provenance or {}))
        if name:
            prov.setdefault("name", name)
        return manifests.build_manifest(
            kind,
            digest,
            file_name=os.path.basename(local_path),
            source=source or os.path.abspath(local_path),
            tool=tool,
            verification=verification,
            verified_at=manifests.utc_now(),
            metadata=metadata,
            provenance=prov,
        )

    def _incoming_name(self, oid: str) -> str:
        return self.backend.path(INCOMING, f"{oid}.{uuid.uuid4().hex}.part")

    def _check_unchanged(self, local_path: str, before: os.stat_result) -> None:
        if file_version(os.stat(local_path)) != file_version(before):
            raise IntegrityError(f"{local_path} changed while it was being stored; nothing was published")

    def _verify_stored(self, path: str, digest: FileDigest) -> str:
        size = self.fs.info(path)["size"]
        if size != digest.size:
            raise IntegrityError(f"stored size {size} != local size {digest.size} for {digest.blake3}; nothing was published")
        if self.verify_upload == "size":
            return "size"
        got = self._hash_remote(path)
        if got.blake3 != digest.blake3:
            raise IntegrityError(f"stored bytes hash to {got.blake3}, expected {digest.blake3}; nothing was published")
        return "rehash"

    def _publish_bytes(self, data: bytes, final: str) -> None:
        if self.backend.atomic_put:  # one PUT is all-or-nothing: no rename (a copy, on S3) needed
            self.fs.pipe_file(final, data)
            return
        tmp = self.backend.path(INCOMING, f"{uuid.uuid4().hex}.part")
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)
        except BaseException:
            self._discard(tmp)
            raise

    def _discard(self, path: str) -> None:
        with contextlib.suppress(Exception):
            if self.fs.exists(path):
                self.fs.rm(path)

    # -- reading ------------------------------------------------------------------

    def open_object(self, kind: ArtifactKind, oid: str) -> Any | None:
        """Start reading the stored object ``oid`` from its first byte, through the
        backend's reader (``Backend.open_reader``): once this returns, its ``size`` is
        known with no request for the size alone, and :meth:`stream_object` can go on
        with it (``opened=``); close it if it is not streamed. ArtifactNotFound if it
        is not there. None where the backend has no such reader (the local one, whose
        ``size_of`` is a stat)."""
        if self.backend.open_reader is None:
            return None
        path = self.object_path(kind, oid)
        seen = self._found_sizes.pop(path, None)  # find_kind saw it, a moment ago
        with backend_errors(self.backend, f"reading {path}"):
            try:
                return self.backend.open_reader(path, 0)
            except FileNotFoundError:
                if seen is not None:
                    raise removed_while_fetched(self.backend, f"{kind.name} {oid}") from None
                raise ArtifactNotFound(
                    f"no {kind.name} with hash {oid} in {self.backend.name} backend at {self.backend.location}"
                ) from None

    def stream_object(self, path: str, sink: Callable[[bytes], None], offset: int = 0,
                      on_resume: Callable[[int], None] | None = None, opened: Any | None = None) -> int:
        """Hand the bytes of a stored object from byte ``offset`` to ``sink`` in order,
        the fastest way this backend allows (concurrent ranged reads on S3, one
        streamed GET on the filer); return how many bytes were handed on. ``opened``:
        a read of ``path`` from ``offset`` started already (:meth:`open_object`), used
        for the first attempt.

        A read cut part-way (the backend raises ConnectionError or TimeoutError after
        its own retries) continues from the next byte with a ranged read, at most
        ``backend.resumes`` times; ``on_resume(byte)`` is told each time. A read that
        failed before handing on anything is not resumed: the backend's retries have
        already spent their budget on it.
        """
        delivered = 0

        def counted(chunk) -> None:
            nonlocal delivered
            sink(chunk)
            delivered += len(chunk)

        resumes, t0 = 0, time.monotonic()
        with backend_errors(self.backend, f"reading {path}"):
            while True:
                before, early = delivered, opened is not None
                try:
                    read = opened if early else self._open_read(path, offset + delivered)
                    opened = None
                    with read:
                        read.stream(counted)
                    return delivered
                except (ConnectionError, TimeoutError) as exc:
                    if early and delivered == before:
                        continue  # an answer opened before, gone stale while it waited: asked for afresh, once
                    if delivered == before or resumes >= self.backend.resumes:
                        if not resumes:
                            raise
                        # Said once, for the whole read: how many tries it had, over how long.
                        gave_up = ConnectionError(f"{exc}; gave up after {resumes + 1} attempts")
                        gave_up.attempts, gave_up.seconds = resumes + 1, time.monotonic() - t0
                        raise gave_up from exc
                resumes += 1
                if on_resume is not None:
                    on_resume(offset + delivered)
                if resumes > 1:  # as urllib3 does: the first at once, a cut is rarely a dead server
                    time.sleep(self.backend.resume_backoff * 2 ** (resumes - 1))

    def _open_read(self, path: str, offset: int):
        if self.backend.open_reader is not None:
            return self.backend.open_reader(path, offset)
        return _FileRead(self.fs, path, offset)

    def read_manifest(self, kind: ArtifactKind, oid: str) -> dict[str, Any]:
        found = self._read_manifest_or_none(kind, oid)
        if found is None:
            raise ArtifactNotFound(f"no manifest for {kind.name} {oid} in {self.backend.name} backend at {self.backend.location}")
        return found

    def _read_manifest_or_none(self, kind: ArtifactKind, oid: str) -> dict[str, Any] | None:
        """The manifest, None if there is none; IntegrityError if it is not a manifest of ``oid``."""
        path = self.manifest_path(kind, oid)
        with backend_errors(self.backend, f"reading {path}"):
            try:
                data = self.fs.cat_file(path)
            except FileNotFoundError:
                return None
        try:
            found = manifests.loads(data)
        except ValueError:
            raise IntegrityError(f"manifest {path} is damaged (not JSON)") from None
        if not isinstance(found, dict) or found.get("blake3") != oid:
            raise IntegrityError(f"manifest {path} is damaged (it does not describe {oid})")
        return found

    def _sound_manifest_or_none(self, kind: ArtifactKind, oid: str) -> dict[str, Any] | None:
        try:
            return self._read_manifest_or_none(kind, oid)
        except IntegrityError:
            return None  # rewritten by the caller

    def _hash_remote(self, path: str) -> FileDigest:
        hasher = StreamHasher()
        self.stream_object(path, hasher.update)
        return hasher.digest()

    def verify(self, kind: ArtifactKind, oid: str) -> ObjectCheck:
        """Re-read a stored object and compare its BLAKE3 with its name."""
        validate_oid(oid)
        path = self.object_path(kind, oid)
        with backend_errors(self.backend, f"verifying {path}"):
            if not self.fs.exists(path):
                return ObjectCheck(kind, oid, False, "missing")
            got = self._hash_remote(path)
        if got.blake3 != oid:
            return ObjectCheck(kind, oid, False, f"corrupt: bytes hash to {got.blake3}", got.size)
        try:
            manifest = self._read_manifest_or_none(kind, oid)
        except IntegrityError as exc:
            return ObjectCheck(kind, oid, False, f"bytes ok, but {exc}", got.size)
        if manifest is None:
            return ObjectCheck(kind, oid, False, "bytes ok, but the manifest is missing", got.size)
        if manifest.get("size_bytes") not in (None, got.size):
            return ObjectCheck(kind, oid, False, f"bytes ok, but the manifest says {manifest['size_bytes']} bytes",
                               got.size)
        return ObjectCheck(kind, oid, True, "ok", got.size)

    def list(self, kind: ArtifactKind) -> list[dict[str, Any]]:
        """Objects of a kind: ``{"oid", "size", "modified"}`` per stored object (modified:
        ISO 8601 UTC, from the listing itself, None where the backend gives no time)."""
        folder = self.backend.path(kind.folder)
        with backend_errors(self.backend, f"listing {folder}"):
            try:
                entries = self.fs.ls(folder, detail=True)
            except FileNotFoundError:
                return []
        out = []
        for e in entries:
            base = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(kind.suffix) and not base.endswith(".manifest.json"):
                out.append({"oid": base[: -len(kind.suffix)], "size": e.get("size", 0), "modified": _modified(e)})
        return sorted(out, key=lambda d: d["oid"])


def _modified(entry: dict[str, Any]) -> str | None:
    """An fsspec listing entry's modification time, whichever way the backend spells it."""
    from datetime import datetime, timezone

    value = entry.get("LastModified") or entry.get("mtime")  # s3fs | local, filer
    try:
        if isinstance(value, (int, float)):
            when = datetime.fromtimestamp(value, timezone.utc)
        elif isinstance(value, datetime):
            when = value
        elif isinstance(value, str):
            when = datetime.fromisoformat(value)
        else:
            return None
    except ValueError:
        return None
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
