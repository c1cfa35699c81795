"""The content-addressed artifact store, over any :class:`~slp_runner.backends.Backend`.

Invariant: nothing is ever visible under ``<kind>/<hash>`` whose bytes do not hash
to ``<hash>``. Where the backend hashes what it sends (``Backend.verified_upload``:
the filer, S3), the file is hashed again as it streams out and published only if
the bytes sent hash right: the filer renames from ``.incoming/``, S3 completes a
multipart upload written in place. Elsewhere (local, or ``verify_upload="rehash"``)
it goes to ``.incoming/`` under a unique name, is checked (size, or a full re-read
and re-hash), and only then renamed into place. Manifests follow the same way, or
in one all-or-nothing PUT. Readers never see a partial object.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from . import manifest as manifests
from .artifacts import KINDS, MODEL, PROMPTS, ArtifactKind
from .backends import Backend
from .errors import ArtifactNotFound, BackendError, ConfigError, InputError, IntegrityError, SlpError
from .hashing import FileDigest, StreamHasher, hash_file, validate_oid
from .jsonl import count_prompt_records
from .redaction import mask_names

VERIFY_MODES = ("size", "rehash")
# How a put checks an object already stored under the hash before deduplicating
# against it: ``size`` (one metadata request) or ``hash`` (re-read and re-hash it).
EXISTING_CHECKS = ("size", "hash")
INCOMING = ".incoming"


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


@contextlib.contextmanager
def backend_errors(backend: Backend, what: str) -> Iterator[None]:
    """Turn whatever a backend raises into one SlpError line naming the backend."""
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
        raise BackendError(f"{backend.name} backend {how} at {backend.location}{tried(exc)} ({what})") from exc
    except Exception as exc:  # botocore, aiohttp and requests errors are not all OSErrors
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "connect" in msg.lower() or "endpoint" in msg.lower():
            raise BackendError(f"{backend.name} backend unreachable at {backend.location}{tried(exc)} ({what})") from exc
        raise BackendError(f"{backend.name} backend at {backend.location}: {what} failed: {msg}") from exc


class ArtifactStore:
    """Put and read artifacts by BLAKE3 hash on one backend.

    verify_upload: ``size`` compares the stored size with the local file's (and
    that the local file did not change while it was sent; where the backend hashes
    what it sends, the sent bytes are hashed instead: ``inline-hash``); ``rehash``
    reads the stored object back and hashes it before it is published.
    """

    def __init__(self, backend: Backend, verify_upload: str = "size", verify_existing: str = "size"):
        if verify_upload not in VERIFY_MODES:
            raise ConfigError(f"unknown upload verification {verify_upload!r} (choose from {', '.join(VERIFY_MODES)})")
        if verify_existing not in EXISTING_CHECKS:
            raise ConfigError(f"unknown verify_existing {verify_existing!r} (choose from {', '.join(EXISTING_CHECKS)})")
        self.backend = backend
        self.fs = backend.fs
        self.verify_upload = verify_upload
        self.verify_existing = verify_existing

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
        for kind in KINDS.values():
            if self.exists(kind, oid):
                return kind
        for kind in KINDS.values():  # the object may be lost while its manifest is not (repair)
            with backend_errors(self.backend, f"checking {self.manifest_path(kind, oid)}"):
                if self.fs.exists(self.manifest_path(kind, oid)):
                    return kind
        raise ArtifactNotFound(f"no artifact with hash {oid} in {self.backend.name} backend at {self.backend.location}")

    def require(self, kind: ArtifactKind, oid: str) -> None:
        self.size_of(kind, oid)

    def size_of(self, kind: ArtifactKind, oid: str) -> int:
        """The stored object's size in bytes; ArtifactNotFound if it is not there."""
        path = self.object_path(kind, oid)
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
        file that does not hash to it (``repair``), before anything is sent.
        """
        local_path = os.fspath(local_path)
        if not os.path.exists(local_path):
            raise InputError(f"{local_path}: no such file")
        if not os.path.isfile(local_path):
            raise InputError(f"{local_path}: not a regular file")
        metadata = self._inspect(local_path, kind)

        before = os.stat(local_path)
        t0 = time.perf_counter()
        digest = hash_file(local_path, sha256=sha256)
        hash_seconds = time.perf_counter() - t0
        oid = digest.blake3
        if expect_oid is not None and oid != expect_oid:
            raise InputError(f"{local_path} hashes to {oid}, not {expect_oid}: it cannot stand for that object")
        final = self.object_path(kind, oid)
        mpath = self.manifest_path(kind, oid)

        with backend_errors(self.backend, f"storing {final}"):
            self.backend.ensure_writable()
            how = verify_existing or self.verify_existing
            if how not in EXISTING_CHECKS:  # the constructor checked the default; this is a per-call choice
                raise ConfigError(f"unknown verify_existing {how!r} (choose from {', '.join(EXISTING_CHECKS)})")
            present, damage = self._check_existing(final, digest, how)
            if not present and self._sound_manifest_or_none(kind, oid) is not None:
                damage = "the object was missing, its manifest was not"
            if present and damage is None:
                existing = self._sound_manifest_or_none(kind, oid)
                rewritten = existing is None  # an earlier put stopped between object and manifest, or it was damaged
                if rewritten:
                    existing = self._new_manifest(kind, digest, local_path, name, source, provenance, tool, metadata, "existing")
                # Published again even when sound: its new time tells a gc (slp_runner.gc) that listed
                # this object as old and unreferenced to keep it, as gc re-checks just before deleting.
                self._publish_bytes(manifests.dumps(existing), mpath)
                if self.fs.exists(final):  # still there after the refresh: a gc re-checking sees the new time
                    return PutResult(kind, oid, digest.size, False, 0.0, hash_seconds, "existing", existing, final,
                                     digest.sha256, manifest_rewritten=rewritten)
                # else a gc deleted it meanwhile: store it again, as a new object

            t1 = time.perf_counter()
            if self.backend.verified_upload is not None and self.verify_upload == "size":
                verification = self._write_verified(local_path, final, digest, before, callback)
            else:
                verification = self._write_then_rename(local_path, final, digest, before, callback)
            seconds = time.perf_counter() - t1
            record = self._sound_manifest_or_none(kind, oid) if damage else None
            if record is None:
                record = self._new_manifest(kind, digest, local_path, name, source, provenance, tool, metadata, verification)
            if damage:
                record["integrity"].update(repaired_at=manifests.utc_now(), repair_reason=damage,
                                           verification_method=verification)
            self._publish_bytes(manifests.dumps(record), mpath)
        return PutResult(kind, oid, digest.size, True, seconds, hash_seconds, verification, record, final, digest.sha256,
                         repaired=damage)

    def _check_existing(self, final: str, digest: FileDigest, how: str) -> tuple[bool, str | None]:
        """``(present, damage)`` for the object at ``final``: damage is None when it is
        sound by the chosen check, else a one-line reason."""
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

    def _new_manifest(self, kind, digest, local_path, name, source, provenance, tool, metadata, verification):
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
        after = os.stat(local_path)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
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

    def stream_object(self, path: str, sink: Callable[[bytes], None], offset: int = 0,
                      on_resume: Callable[[int], None] | None = None) -> int:
        """Hand the bytes of a stored object from byte ``offset`` to ``sink`` in order,
        the fastest way this backend allows (concurrent ranged reads on S3, one
        streamed GET on the filer); return how many bytes were handed on.

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
                before = delivered
                try:
                    self._stream_from(path, counted, offset + delivered)
                    return delivered
                except (ConnectionError, TimeoutError) as exc:
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

    def _stream_from(self, path: str, sink: Callable[[bytes], None], offset: int) -> None:
        if self.backend.ordered_reader is not None:
            self.backend.ordered_reader(path, sink, offset=offset)
            return
        with self.fs.open(path, "rb", **self.backend.read_options) as f:
            if offset:
                f.seek(offset)
            while chunk := f.read(self.backend.read_chunk):
                sink(chunk)

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
