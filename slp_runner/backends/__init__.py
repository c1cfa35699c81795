"""Storage backends: an fsspec filesystem plus the folder the store lives in.

Each factory here is the ``_target_`` of one file in ``slp_runner/conf/backend/``. The store
only ever sees a :class:`Backend`; it never knows which kind it is.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec

from ..errors import ConfigError
from ..hashing import STREAM_CHUNK
from ..redaction import REDACTED, strip_url_password

# S3's rule for a bucket name (AWS, MinIO and SeaweedFS's gateway alike). Checked here
# because botocore lets capitals and "_" through to the server, and words its own
# refusal of the rest over several lines.
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
BUCKET_RULE = ("3-63 characters: lowercase letters, digits, dots and hyphens, "
               "starting and ending with a letter or digit")
# botocore's rule for a region: a host label, not all digits.
REGION_RE = re.compile(r"(?![0-9]+$)(?!-)[a-zA-Z0-9-]{1,63}(?<!-)")
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
# Files up to this size are put from one buffer (Backend.buffered_put_max): on weed s3
# (2 cores) a 16 MiB put took 188 ms streamed, read and hashed twice, against 158 for
# boto3's upload_file; larger ones are streamed, so memory stays flat in file size.
BUFFERED_PUT_MAX = 16 * 1024 * 1024
# The filer's: from 8 MiB its upload starts while the file is hashed (store.AHEAD_MIN),
# which measured faster there (8 MiB: 64 ms, buffered 70, curl -T 66); at 1 MiB the
# buffer was (21 ms, streamed 23, curl 24).
FILER_BUFFERED_PUT_MAX = 4 * 1024 * 1024


@dataclass
class Backend:
    """Where artifacts live.

    name: the backend's config name (``local``, ``seaweedfs``, ``s3``).
    fs: any fsspec filesystem.
    root: the folder inside ``fs`` that holds ``models/``, ``prompts/``, ``results/``, ``runs/``.
    location: a credential-free description (URL or path) for messages and manifests.
    write_options: keyword arguments for ``fs.put_file`` (part sizes and the like).
    local_paths: the filesystem's paths are this machine's paths (the local backend):
        a get can then let the kernel copy the file and hash the copy.
    open_reader: ``open_reader(path, offset)`` starts a read of ``path`` from byte
        ``offset`` the fastest way this backend allows (concurrent ranged GETs on S3,
        one streamed GET on the filer): it returns once the first request is answered,
        so a missing object has raised FileNotFoundError and its ``size`` (the whole
        object's) is known before a byte is read, with no request for the size alone.
        ``stream(sink)`` then calls ``sink(bytes)`` in order; ``close()`` drops what
        was not read. None: the store opens ``fs`` and ``seek``s.
    resumes: how many times one read of an object, cut by a dropped connection or a
        timeout part-way, continues from the next byte (a ranged read) before the
        error is reported; the first at once, the n-th after ``resume_backoff * 2**(n-1)`` s.
    atomic_put: a single write is all-or-nothing (an S3 PUT; a filer PUT, whose entry
        appears only once the whole body is stored): manifests and run files are then
        written in place instead of through a temporary name.
    verified_upload: set where the backend hashes the bytes it sends and publishes them
        only if they hash right: ``verified_upload(local_path, path, check, incoming=,
        callback=)`` sends the file, hashing it in the same read, and makes it visible
        at ``path`` only if ``check(digest)`` passes. S3 writes straight to ``path``
        (a multipart upload is invisible until completed); the filer writes the
        temporary name ``incoming`` and renames it. Elsewhere (local) the store copies
        to a temporary name, checks the size and renames.
    prepare_write: what must exist before the first write (an S3 bucket), made once.
    buffered_put_max: with ``atomic_put``, a file up to this many bytes is read into
        memory once, hashed there, and that very buffer is written in one PUT under
        its hash: one read, one hash and one request where a streamed upload takes two
        of each (0: never).
    prepare_put: ``prepare_put(path, data)`` readies the one PUT of such a buffer (on
        S3, computes the checksum it is sent with) and returns the call that sends
        it; the store readies it while it looks the hash up. None: ``fs.pipe_file``.
    same_machine: the service runs on this machine (its URL names a loopback address):
        work the client adds beside a transfer takes a core from the server.
    file_info: ``file_info(path)`` is ``{"size": ..., "type": "file"}`` of a stored
        file in one request, None if there is none, where ``fs.info`` takes more for a
        missing one (s3fs lists the key as a folder after a HEAD that found nothing).
    """

    name: str
    fs: Any
    root: str
    location: str
    write_options: dict = field(default_factory=dict)
    local_paths: bool = False
    open_reader: Callable[[str, int], Any] | None = None
    resumes: int = 0
    resume_backoff: float = 0.2
    atomic_put: bool = False
    verified_upload: Callable[..., None] | None = None
    prepare_write: Callable[[], None] | None = None
    buffered_put_max: int = 0
    prepare_put: Callable[[str, bytes], Callable[[], None]] | None = None
    file_info: Callable[[str], dict | None] | None = None
    same_machine: bool = False

    def ensure_writable(self) -> None:
        """Create what must exist before the first write (an S3 bucket, say); once."""
        if self.prepare_write is not None:
            self.prepare_write()
            self.prepare_write = None

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts]) if self.root else "/".join(parts)


# -- checks of what the user typed ------------------------------------------------
# A backend key with a wrong value fails here, when the backend is built, as one
# ConfigError naming ``backend.<key>`` and the value: later it would surface as an
# "unreachable" backend or a library's message about something else.


def _typed(value: Any) -> str:
    """A value as the user typed it: ``'abc'`` quoted, ``-1``, ``true``."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _seconds(key: str, value: Any, *, zero: bool) -> float:
    """``value`` as a finite number of seconds, more than 0 (or 0 or more: ``zero``)."""
    bound = "0 or more" if zero else "more than 0"
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        raise ConfigError(f"backend.{key}: {_typed(value)} is not a number of seconds ({bound})")
    return seconds


def _count(key: str, value: Any, *, least: int, unit: str = "") -> int:
    """``value`` as a whole number of at least ``least`` (``5``, or ``"5"`` from an env variable)."""
    try:
        number = int(value, 10) if isinstance(value, str) else value
    except ValueError:
        number = None
    if not isinstance(number, int) or isinstance(number, bool) or number < least:
        raise ConfigError(f"backend.{key}: {_typed(value)} is not a whole number{unit} ({least} or more)")
    return number


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"backend.{key}: {_typed(value)} is not true or false (yes/no, on/off)")


def _shown_url(url: str) -> str:
    """``url`` for a message, with whatever may be a password masked, even where the URL
    is malformed (no scheme, no host) and so beyond :func:`strip_url_password`'s pattern:
    everything between the user name's ``:`` and the last ``@``, or the whole user part."""
    head, at, host = url.rpartition("@")
    if not at:
        return url
    scheme, sep, userinfo = head.partition("://") if "://" in head else ("", "", head)
    user, colon, _ = userinfo.partition(":")
    if colon and "/" not in user:
        return f"{scheme}{sep}{user}:{REDACTED}@{host}"
    return f"{scheme}{sep}{REDACTED}@{host}"


def _http_url(key: str, value: Any, example: str) -> str:
    """``value`` if it is an http(s) URL with a host (and, if any, a numeric port)."""
    from urllib.parse import urlsplit  # stdlib, already loaded by fsspec

    ok = isinstance(value, str) and not any(c.isspace() for c in value)
    if ok:
        try:
            parts = urlsplit(value)
            _ = parts.port  # a port that is not a number in range raises ValueError
            ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        except ValueError:
            ok = False
    if not ok:
        shown = repr(_shown_url(value)) if isinstance(value, str) else _typed(value)
        raise ConfigError(f"backend.{key}: {shown} is not an http(s) URL (like {example})")
    return value


def _bucket(value: Any) -> str:
    bucket = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(bucket, str) or not BUCKET_RE.fullmatch(bucket):
        raise ConfigError(f"backend.bucket: {_typed(value)} is not an S3 bucket name ({BUCKET_RULE})")
    return bucket


def _region(value: Any) -> str | None:
    if value is not None and not (isinstance(value, str) and REGION_RE.fullmatch(value)):
        raise ConfigError(f"backend.region: {_typed(value)} is not an AWS region name (like us-east-1: "
                          f"letters, digits and hyphens)")
    return value


def local_backend(root: str, **_: Any) -> Backend:
    """The embedded default: a folder on this machine, through fsspec's LocalFileSystem
    (whose put reports its progress: :mod:`.local`)."""
    from .local import ReportingLocalFileSystem

    root = os.path.abspath(os.path.expanduser(root))
    fs = ReportingLocalFileSystem(auto_mkdir=True)
    return Backend("local", fs, root, root, local_paths=True)


def seaweedfs_backend(filer_url: str, root: str = "", timeout: float = 60.0, retries: int = 5,
                      backoff: float = 0.2, **_: Any) -> Backend:
    """A SeaweedFS filer over its HTTP API.

    ``retries``: a failed request is tried again at most this many times, retry n >= 2
    after ``backoff * 2**(n-1)`` seconds plus jitter (the first at once); a read cut
    part-way continues with a ranged GET at most this many times."""
    filer_url = _http_url("filer_url", filer_url, "http://127.0.0.1:8888")
    timeout = _seconds("timeout", timeout, zero=False)
    retries = _count("retries", retries, least=0)
    backoff = _seconds("backoff", backoff, zero=True)
    fs = fsspec.filesystem("seaweedfs", filer_url=filer_url, timeout=timeout, retries=retries, backoff=backoff,
                           skip_instance_cache=True)
    location = strip_url_password(f"{filer_url.rstrip('/')}/{root.strip('/')}")
    from .seaweedfs import StreamedRead, upload_verified

    return Backend("seaweedfs", fs, root.strip("/"), location,
                   open_reader=functools.partial(StreamedRead, fs, chunk=STREAM_CHUNK),
                   resumes=retries, resume_backoff=backoff, atomic_put=True,
                   verified_upload=functools.partial(upload_verified, fs),
                   buffered_put_max=FILER_BUFFERED_PUT_MAX, same_machine=_on_loopback(filer_url))


def _on_loopback(url: str) -> bool:
    """The URL's host is this machine by its address (127.0.0.0/8, ::1) or ``localhost``;
    no name is looked up."""
    import ipaddress
    from urllib.parse import urlsplit

    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def s3_backend(
    endpoint_url: str | None,
    bucket: str,
    root: str = "",
    key: str | None = None,
    secret: str | None = None,
    region: str = "us-east-1",
    create_bucket: bool = True,
    connect_timeout: float = 5.0,
    retries: int = 5,
    backoff: float = 0.2,
    part_size_mb: int = 8,
    max_concurrency: int = 4,
    read_concurrency: int = 4,  # 8 x 8 MiB ran slower on a 2-core weed s3 (more CPU; 270 vs 348 MiB/s)
    **_: Any,
) -> Backend:
    """Any S3 service through s3fs (tested against SeaweedFS's ``weed s3`` gateway).

    Credentials come from the arguments, else from the usual AWS environment
    variables and files; they are never part of ``location``. Multipart uploads keep
    at most ``max_concurrency`` parts of ``part_size_mb`` in memory (s3fs's defaults,
    10 x 50 MiB, held over 1 GiB for a 1 GiB file).

    ``retries``: botocore's ``standard`` retry mode makes at most ``retries + 1``
    attempts of a request (connection errors, timeouts, 5xx, throttling), with its
    own exponential backoff and jitter; a ranged GET whose body was cut is asked for
    again at most ``retries`` times (each a botocore request with its own attempts);
    a download cut even so continues from the next byte at most ``retries`` times
    (the first at once, the n-th after ``backoff * 2**(n-1)`` seconds).
    """
    # Before s3fs is imported: a typo fails at once, and the same way with or without it.
    if endpoint_url not in (None, ""):
        endpoint_url = _http_url("endpoint_url", endpoint_url, "http://127.0.0.1:8333")
    bucket = _bucket(bucket)
    region = _region(region)
    create_bucket = _flag("create_bucket", create_bucket)
    connect_timeout = _seconds("connect_timeout", connect_timeout, zero=False)
    retries = _count("retries", retries, least=0)
    backoff = _seconds("backoff", backoff, zero=True)
    part_size_mb = _count("part_size_mb", part_size_mb, least=1, unit=" of MiB")
    max_concurrency = _count("max_concurrency", max_concurrency, least=1)
    read_concurrency = _count("read_concurrency", read_concurrency, least=1)
    try:
        import s3fs
    except ImportError:
        raise ConfigError("backend=s3 needs s3fs: pip install 'slp-runner[s3]'") from None

    from .s3_multipart import OrderedRead, head_file, prepare_put, upload_verified

    client_kwargs = {"region_name": region}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    fs = s3fs.S3FileSystem(
        key=key or None,
        secret=secret or None,
        client_kwargs=client_kwargs,
        config_kwargs={"connect_timeout": connect_timeout,
                       "retries": {"mode": "standard", "total_max_attempts": retries + 1}},
        # 1: a whole-object cat_file (a manifest) is one GET, not a HEAD (and, for a
        # missing key, a listing) to size it first; uploads and downloads of objects
        # bring their own concurrency (write_options, upload_verified, OrderedRead).
        max_concurrency=1,
        skip_instance_cache=True,
    )
    # s3fs's own loop around a GET and its body read (default 5); OrderedRead's around a part's body.
    fs.retries = retries + 1
    # The parts client's connections: upload parts, or ranged reads and the first one's answer.
    fs._slp_parts_pool = max(max_concurrency, read_concurrency + 1)
    location = strip_url_password(f"{(endpoint_url or 's3:/').rstrip('/')}/{bucket}/{root.strip('/')}".rstrip("/"))

    def make_bucket() -> None:
        if create_bucket and not fs.exists(bucket):
            try:
                fs.mkdir(bucket)
            except FileExistsError:  # made meanwhile by a concurrent first write (two stages, two processes)
                pass

    return Backend(
        "s3", fs, "/".join(p for p in (bucket, root.strip("/")) if p), location,
        write_options={"chunksize": part_size_mb * 1024 * 1024, "max_concurrency": max_concurrency},
        verified_upload=functools.partial(upload_verified, fs, part_size=part_size_mb * 1024 * 1024,
                                          concurrency=max_concurrency),
        open_reader=functools.partial(OrderedRead, fs, part_size=part_size_mb * 1024 * 1024,
                                      concurrency=read_concurrency),
        prepare_write=make_bucket,
        buffered_put_max=BUFFERED_PUT_MAX,
        prepare_put=functools.partial(prepare_put, fs),
        file_info=functools.partial(head_file, fs),
        atomic_put=True,
        resumes=retries,
        resume_backoff=backoff,
    )
