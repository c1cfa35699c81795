"""Concurrent S3 transfers that keep BLAKE3 in the loop.

A verified S3 multipart upload: parts go out concurrently, the bytes sent are
hashed in order as they are read, and the upload is completed (made visible) only
if the caller's check of that hash passes; otherwise it is aborted.

This is what lets the store write straight to ``models/<hash>.gguf`` on S3 with no
temporary name and no server-side copy, while nothing is ever visible under a
hash its bytes do not match. Memory holds at most ``concurrency + 1`` parts.

The parts go through a plain (synchronous) botocore client, one request per thread,
as boto3's transfer manager sends them (s3fs's client hashes every body in its one
event-loop thread, so parts queued there for the CPU: on weed s3, 2 cores, a 256 MiB
upload took 2.37 s through s3fs and 2.22 s in threads). The client is made once per
filesystem from s3fs's own endpoint, credentials, retries and loaded service model
(about 30 ms).

Each body is sent with its CRC32 in a signed header (``x-amz-checksum-crc32``), which
the server checks: a body damaged on the way is refused (``BadDigest``), by AWS and by
weed s3 alike. The payload itself is not signed (``UNSIGNED-PAYLOAD``, what botocore
does over https anyway): over http botocore would otherwise hash every body with
SHA-256 for the signature too, 12 ms per 16 MiB on top of CRC32's 6.5, a check weed s3
does not even make (a body changed after signing was stored; a wrong CRC32 was not).
The CRC32 is computed here, in the part's own thread (zlib lets go of the GIL), and
given to botocore: left to botocore without a signed payload it streams the body in
``aws-chunked`` encoding with a trailing checksum, which took 30 ms more for 16 MiB.
A file damaged on its way in still cannot be published under its hash: that is the
BLAKE3 of the bytes sent, checked before the upload is completed.

An ordered ranged download (``OrderedRead``): parts are fetched concurrently through
the same client (as boto3's transfer manager does) and handed on in order, so the cache
hashes while it writes; the first part's response gives the size, so no HEAD is
needed. It can start at any byte (a resumed download), and a part that fails for good
after the retries below it (botocore's per request, ours around each body read) is
reported as ``ConnectionError``/``TimeoutError`` so the reader can continue from there.
"""

from __future__ import annotations

import base64
import contextlib
import zlib
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from itertools import islice
from typing import Callable

from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from ..hashing import FileDigest, StreamHasher

MIN_PART = 5 * 1024 * 1024  # S3's smallest part but the last


def upload_verified(fs, local_path: str, path: str, check: Callable[[FileDigest], None], *,
                    part_size: int = 16 * 1024 * 1024, concurrency: int = 4,
                    callback: Callback = DEFAULT_CALLBACK, incoming: str | None = None) -> None:
    """``incoming``: unused, an uncompleted multipart upload is invisible already.
    Smaller files never come here: the store sends them from one buffer in one PUT
    (``Backend.buffered_put_max``). A file emptied meanwhile sends no part, and the
    check of its hash refuses it before the upload is completed."""
    bucket, key, _ = fs.split_path(path)
    part_size = max(part_size, MIN_PART)
    client = parts_client(fs, concurrency)
    upload_id = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    sent = StreamHasher(threads=1)
    parts: dict[int, str] = {}
    try:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="slp-s3-part") as pool, \
                open(local_path, "rb") as src:
            in_flight = {}
            number = 0
            while chunk := src.read(part_size):
                number += 1
                sent.update(chunk)
                in_flight[pool.submit(_upload_part, client, bucket, key, upload_id, number, chunk)] = len(chunk)
                while len(in_flight) >= concurrency:
                    _collect(wait(in_flight, return_when=FIRST_COMPLETED)[0], in_flight, parts, callback)
            while in_flight:
                _collect(wait(in_flight, return_when=FIRST_COMPLETED)[0], in_flight, parts, callback)
        check(sent.digest())
        fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                   MultipartUpload={"Parts": [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]})
    except BaseException:
        with contextlib.suppress(Exception):
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        raise
    fs.invalidate_cache(path)


def head_file(fs, path: str) -> dict | None:
    """A stored object's size in one HEAD, None if there is none. (s3fs's ``info``
    lists the key as a folder after a HEAD that found nothing: two requests.)"""
    bucket, key, _ = fs.split_path(path)
    try:
        out = fs.call_s3("head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    return {"name": path, "size": out["ContentLength"], "type": "file"}


def prepare_put(fs, path: str, data: bytes) -> Callable[[], None]:
    """``Backend.prepare_put``: one all-or-nothing PUT of ``data`` at ``path``, readied
    (its CRC32 computed, see the top) while the store looks the hash up; the call
    returned sends it through the parts client."""
    bucket, key, _ = fs.split_path(path)
    client = parts_client(fs, 1)
    checksum = _crc32(data)

    def send() -> None:
        _send(client.put_object, f"S3 PUT of {bucket}/{key}", Bucket=bucket, Key=key, Body=data,
              ChecksumCRC32=checksum)
        fs.invalidate_cache(path)

    return send


def _upload_part(client, bucket, key, upload_id, number, data) -> tuple[int, str]:
    out = _send(client.upload_part, f"S3 upload of part {number} of {bucket}/{key}", Bucket=bucket, Key=key,
                UploadId=upload_id, PartNumber=number, Body=data, ChecksumCRC32=_crc32(data))
    return number, out["ETag"]


# A server's words for a body that does not match the checksum sent with it (weed s3
# and AWS say BadDigest, whichever checksum it was).
_BODY_DAMAGED = {"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"}


def _crc32(data: bytes) -> str:
    return base64.b64encode((zlib.crc32(data) & 0xFFFFFFFF).to_bytes(4, "big")).decode()


def _send(call: Callable[..., dict], what: str, **kwargs) -> dict:
    """A request of the parts client, its errors in s3fs's terms (which the store knows):
    a transport error is a ``ConnectionError``, a server's answer an ``OSError`` kind."""
    try:
        return call(**kwargs)
    except Exception as exc:
        if _is_transport_error(exc):  # a backend that did not answer
            raise _transport_error(exc, what) from exc
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code")
            if code in _BODY_DAMAGED:  # damaged on the way: what the server got is not what was hashed
                raise OSError(f"the server received bytes other than those sent ({code}: the body's checksum "
                              f"did not match); nothing was published") from exc
            from s3fs.errors import translate_boto_error

            raise translate_boto_error(exc) from exc
        raise


def parts_client(fs, pool: int):
    """The synchronous botocore client that sends ``fs``'s upload parts (see the top):
    made on first use with s3fs's endpoint, region, timeouts, retries and credentials,
    and ``pool`` connections; kept on ``fs``."""
    client = getattr(fs, "_slp_parts_client", None)
    if client is not None:
        return client
    pool = max(pool, getattr(fs, "_slp_parts_pool", 0))  # what every user of it needs (s3_backend)
    import botocore
    import botocore.config
    import botocore.session

    fs.connect()
    session = botocore.session.Session()
    session.register_component("data_loader", fs.session.get_component("data_loader"))  # models parsed once
    config = dict(fs.config_kwargs, max_pool_connections=max(pool, 10),
                  s3=dict(fs.config_kwargs.get("s3") or {}, payload_signing_enabled=False))  # see the top
    kwargs = {k: v for k, v in fs.client_kwargs.items() if k in ("endpoint_url", "region_name", "verify", "use_ssl")}
    if fs.anon:
        config["signature_version"] = botocore.UNSIGNED
    elif fs.key:
        kwargs.update(aws_access_key_id=fs.key, aws_secret_access_key=fs.secret, aws_session_token=fs.token)
    # else: botocore's chain (environment, files, instance roles), as s3fs's session found
    # them, with its own refreshing of credentials that expire
    client = session.create_client("s3", config=botocore.config.Config(**config), **kwargs)
    fs._slp_parts_client = client
    return client


def _collect(done, in_flight, parts, callback) -> None:
    for fut in done:
        size = in_flight.pop(fut)
        number, etag = fut.result()
        parts[number] = etag
        callback.relative_update(size)


class OrderedRead:
    """A read of ``path`` from byte ``offset`` as concurrent ranged GETs, handed on in
    order (``Backend.open_reader``): made, it has sent the first part's GET and has its
    answer, so a missing object has raised FileNotFoundError and ``size`` (the whole
    object's, from ``Content-Range``: no HEAD) is known before a byte is read.
    ``stream(sink)`` then reads that first body while the next parts are already being
    asked for, with at most ``concurrency`` parts in memory; ``close()`` drops a first
    body left unread.

    The GETs go through the parts client, one request per thread, as boto3's transfer
    manager sends them: through s3fs's event loop a 256 MiB get took 437 ms, in threads
    322 (boto3's ``download_file`` 564), and 16 MiB 31 against 27 (medians of 25 and 5,
    alternating, on weed s3). A body cut part-way is asked for again from its part's
    first byte, ``fs.retries`` times in all (what s3fs's own loop around a read did);
    a GET that failed is not (botocore has retried it already)."""

    def __init__(self, fs, path: str, offset: int = 0, *, part_size: int = 8 * 1024 * 1024, concurrency: int = 4):
        self._path, self._offset = path, offset
        self._part_size, self._concurrency = part_size, concurrency
        self._bucket, self._key, _ = fs.split_path(path)
        self._client = parts_client(fs, concurrency + 1)  # + the first part's answer, held
        self._attempts = max(1, int(getattr(fs, "retries", 1)))
        self._body = None
        try:
            first = self._get(offset, offset + part_size)
        except OSError as exc:
            if _invalid_range(exc):  # nothing from ``offset`` on: an empty object, or one read to its end
                self.size = offset
                return
            raise
        total = first.get("ContentRange", "").rpartition("/")[2]
        if not total.isdigit():
            first["Body"].close()
            raise OSError(f"S3 server answered a ranged GET of {path} without the object's size "
                          f"(Content-Range {first.get('ContentRange')!r})")
        self.size = int(total)
        self._body = first["Body"]

    def _get(self, start: int, end: int) -> dict:
        return _send(self._client.get_object, f"S3 ranged GET of {self._path}", Bucket=self._bucket,
                     Key=self._key, Range=f"bytes={start}-{end - 1}")

    def _part(self, start: int, end: int, body=None) -> bytes:
        """Bytes ``start`` to ``end`` (from ``body``, the first part's answer, if given)."""
        for attempt in range(1, self._attempts + 1):
            if body is None:
                body = self._get(start, end)["Body"]
            try:
                return _read_body(body, end - start, self._path, start)
            except (ConnectionError, TimeoutError):
                body = None
                if attempt == self._attempts:
                    raise
        raise AssertionError("unreachable")

    def stream(self, sink: Callable[[bytes], None]) -> None:
        part_size, concurrency = self._part_size, self._concurrency
        body, self._body = self._body, None
        if body is None:
            if self._offset < self.size:
                raise RuntimeError(f"the read of {self._path} was streamed or closed already")
            return
        first_end = min(self._offset + part_size, self.size)
        ranges = ((off, min(off + part_size, self.size)) for off in range(first_end, self.size, part_size))
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="slp-s3-get")
        pending = deque([pool.submit(self._part, self._offset, first_end, body)])
        done = False
        try:
            pending.extend(pool.submit(self._part, a, b) for a, b in islice(ranges, concurrency - 1))
            while pending:
                data = pending.popleft().result()
                for a, b in islice(ranges, 1):
                    pending.append(pool.submit(self._part, a, b))
                sink(data)
            done = True
        finally:
            # A failed part or an interrupt: the parts not started are dropped and those
            # running are not waited for (each ends with its own request).
            pool.shutdown(wait=done, cancel_futures=True)

    def close(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            body.close()

    def __enter__(self) -> OrderedRead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def download_ordered(fs, path: str, sink: Callable[[bytes], None], *, offset: int = 0,
                     part_size: int = 8 * 1024 * 1024, concurrency: int = 4) -> int:
    """Read ``path`` from byte ``offset`` into ``sink`` in order (:class:`OrderedRead`);
    returns the object's size."""
    with OrderedRead(fs, path, offset, part_size=part_size, concurrency=concurrency) as read:
        read.stream(sink)
    return read.size


def _read_body(body, length: int, path: str, start: int) -> bytes:
    """The whole of a ranged GET's body, ``length`` bytes; a cut one raises
    ConnectionError (TimeoutError if the server went silent), never short data."""
    try:
        data = body.read()
    except Exception as exc:
        if isinstance(exc, OSError) or _is_transport_error(exc):
            raise _transport_error(exc, f"S3 ranged GET of {path} from byte {start}") from exc
        raise
    finally:
        body.close()
    if len(data) != length:
        raise ConnectionError(f"S3 ranged GET of {path} from byte {start} ended after {len(data)} of {length} bytes")
    return data


def _invalid_range(exc: BaseException) -> bool:
    cause = exc.__cause__
    return getattr(cause, "response", {}).get("Error", {}).get("Code") == "InvalidRange"


def _transport_error(exc: BaseException, what: str) -> OSError:
    """ConnectionError, or TimeoutError for a server that went silent (what the store
    resumes from), saying ``what`` failed."""
    said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    timed_out = isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower()
    return (TimeoutError if timed_out else ConnectionError)(f"{what} failed after retries: {said}")


def _is_transport_error(exc: BaseException) -> bool:
    """A connection that broke or a body that was cut (botocore's or aiohttp's words for it)."""
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, IncompleteReadError

        if isinstance(exc, (HTTPClientError, BotoConnectionError, IncompleteReadError)):
            return True
    with contextlib.suppress(ImportError):
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return True
    return False
