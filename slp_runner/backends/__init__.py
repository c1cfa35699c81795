"""Storage backends: an fsspec filesystem plus the folder the store lives in.

Each factory here is the ``_target_`` of one file in ``slp_runner/conf/backend/``. The store
only ever sees a :class:`Backend`; it never knows which kind it is.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec

from ..errors import ConfigError
from ..hashing import STREAM_CHUNK
from ..redaction import strip_url_password


@dataclass
class Backend:
    """Where artifacts live.

    name: the backend's config name (``local``, ``seaweedfs``, ``s3``).
    fs: any fsspec filesystem.
    root: the folder inside ``fs`` that holds ``models/``, ``prompts/``, ``results/``, ``runs/``.
    location: a credential-free description (URL or path) for messages and manifests.
    read_options: keyword arguments for ``fs.open(..., "rb")`` that stream best on this backend.
    read_chunk: bytes per ``read()`` when streaming an object (one request each on S3).
    write_options: keyword arguments for ``fs.put_file`` (part sizes and the like).
    local_paths: the filesystem's paths are this machine's paths (the local backend):
        a get can then let the kernel copy the file and hash the copy.
    ordered_reader: set where concurrent ranged reads beat one stream (S3):
        ``ordered_reader(path, sink, offset=0)`` calls ``sink(bytes)`` part by part, in
        order, from byte ``offset``. Elsewhere the store opens the object with
        ``read_options`` and ``seek``s to the offset (a ranged GET on the filer).
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
    """

    name: str
    fs: Any
    root: str
    location: str
    read_options: dict = field(default_factory=dict)
    read_chunk: int = STREAM_CHUNK
    write_options: dict = field(default_factory=dict)
    local_paths: bool = False
    ordered_reader: Callable[..., int] | None = None
    resumes: int = 0
    resume_backoff: float = 0.2
    atomic_put: bool = False
    verified_upload: Callable[..., None] | None = None
    prepare_write: Callable[[], None] | None = None

    def ensure_writable(self) -> None:
        """Create what must exist before the first write (an S3 bucket, say); once."""
        if self.prepare_write is not None:
            self.prepare_write()
            self.prepare_write = None

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts]) if self.root else "/".join(parts)


def local_backend(root: str, **_: Any) -> Backend:
    """The embedded default: a folder on this machine, through fsspec's LocalFileSystem."""
    from fsspec.implementations.local import LocalFileSystem

    root = os.path.abspath(os.path.expanduser(root))
    fs = LocalFileSystem(auto_mkdir=True)
    return Backend("local", fs, root, root, {"block_size": 8 * 1024 * 1024}, local_paths=True)


def seaweedfs_backend(filer_url: str, root: str = "", timeout: float = 60.0, retries: int = 5,
                      backoff: float = 0.2, **_: Any) -> Backend:
    """A SeaweedFS filer over its HTTP API.

    ``retries``: a failed request is tried again at most this many times, retry n >= 2
    after ``backoff * 2**(n-1)`` seconds plus jitter (the first at once); a read cut
    part-way continues with a ranged GET at most this many times."""
    fs = fsspec.filesystem("seaweedfs", filer_url=filer_url, timeout=timeout, retries=retries, backoff=backoff,
                           skip_instance_cache=True)
    location = strip_url_password(f"{filer_url.rstrip('/')}/{root.strip('/')}")
    from .seaweedfs import upload_verified

    return Backend("seaweedfs", fs, root.strip("/"), location, {"block_size": 0},
                   resumes=max(0, int(retries)), resume_backoff=backoff, atomic_put=True,
                   verified_upload=functools.partial(upload_verified, fs))


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
    own exponential backoff and jitter; s3fs re-reads a ranged GET whose body was cut
    at most ``retries + 1`` times (each a botocore request with its own attempts);
    a download cut even so continues from the next byte at most ``retries`` times
    (the first at once, the n-th after ``backoff * 2**(n-1)`` seconds).
    """
    try:
        import s3fs
    except ImportError:
        raise ConfigError("backend=s3 needs s3fs: pip install 'slp-runner[s3]'") from None

    from .s3_multipart import download_ordered, upload_verified

    client_kwargs = {"region_name": region}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    fs = s3fs.S3FileSystem(
        key=key or None,
        secret=secret or None,
        client_kwargs=client_kwargs,
        config_kwargs={"connect_timeout": connect_timeout,
                       "retries": {"mode": "standard", "total_max_attempts": max(0, int(retries)) + 1}},
        # 1: a whole-object cat_file (a manifest) is one GET, not a HEAD (and, for a
        # missing key, a listing) to size it first; uploads and downloads of objects
        # bring their own concurrency (write_options, upload_verified, download_ordered).
        max_concurrency=1,
        skip_instance_cache=True,
    )
    fs.retries = max(0, int(retries)) + 1  # s3fs's own loop around a GET and its body read (default 5)
    location = strip_url_password(f"{(endpoint_url or 's3:/').rstrip('/')}/{bucket}/{root.strip('/')}".rstrip("/"))

    def make_bucket() -> None:
        if create_bucket and not fs.exists(bucket):
            try:
                fs.mkdir(bucket)
            except FileExistsError:  # made meanwhile by a concurrent first write (two stages, two processes)
                pass

    return Backend(
        "s3", fs, "/".join(p for p in (bucket, root.strip("/")) if p), location,
        # Uncached reads of 8 MiB: one ranged GET per read, nothing buffered twice.
        read_options={"block_size": 8 * 1024 * 1024, "cache_type": "none"},
        read_chunk=8 * 1024 * 1024,
        write_options={"chunksize": part_size_mb * 1024 * 1024, "max_concurrency": max_concurrency},
        verified_upload=functools.partial(upload_verified, fs, part_size=part_size_mb * 1024 * 1024,
                                          concurrency=max_concurrency),
        ordered_reader=functools.partial(download_ordered, fs, part_size=part_size_mb * 1024 * 1024,
                                         concurrency=read_concurrency),
        prepare_write=make_bucket,
        atomic_put=True,
        resumes=max(0, int(retries)),
        resume_backoff=backoff,
    )
