"""fsspec filesystem for the SeaweedFS filer HTTP API.

Registered as the ``seaweedfs`` protocol through the ``fsspec.specs`` entry point,
so ``fsspec.filesystem("seaweedfs", filer_url="http://127.0.0.1:8888")`` works for
any fsspec user. Paths are filer paths without the leading slash.

The filer API used here (SeaweedFS 4.x):

- ``PUT /path`` creates or overwrites a file (streamed body), ``?op=append`` appends;
- ``GET /path`` reads a file, honouring ``Range``;
- ``GET /path?metadata=true`` returns the entry as JSON (directories have bit 31 of
  ``Mode`` set, like Go's ``os.ModeDir``);
- ``GET /dir/`` with ``Accept: application/json`` lists, paged by ``lastFileName``;
- ``POST /dir/`` creates a directory; ``DELETE /path[?recursive=true]`` removes;
- ``POST /new?mv.from=/old`` renames atomically (overwriting a file at ``/new``,
  refusing a directory there).

A PUT is all-or-nothing: the filer creates or replaces the entry only once every
chunk of the body is stored, so a cut upload leaves what was there before.
``put_file_hashed`` streams a file up while hashing the bytes it sends, and checks
the size the filer says it stored.

Transient faults (connection errors, timeouts, 5xx) are retried a bounded number of
times with exponential backoff and jitter. Idempotent requests (GET, HEAD) are
retried by urllib3's ``Retry`` on the session; a request that never reached the
filer (connection refused) is retried whatever its method. A PUT body streamed from
a file cannot be replayed by urllib3, so ``put_file`` and ``pipe_file`` retry at
this level, reopening the file, within the same budget. Appends and renames are not
retried once sent. Giving up raises one ``ConnectionError`` naming the attempts and
the time spent; a streamed read cut part-way raises ``ConnectionError`` or
``TimeoutError`` too, and is resumed by the reader with ``seek`` (a ranged GET).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import time
from datetime import datetime
from urllib.parse import quote

import requests
from fsspec.callbacks import DEFAULT_CALLBACK
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import ReadTimeoutError
from urllib3.util.retry import Retry

from ..errors import IntegrityError

_MODE_DIR = 1 << 31
_LIST_PAGE = 1000
_IO_CHUNK = 4 * 1024 * 1024
# Bytes per read of a streamed request body (urllib3's default is 16 KiB): 1 MiB reads
# cost a sixteenth of the Python calls, and BLAKE3 is fastest on large pieces.
_SEND_BLOCK = 1024 * 1024
# The filer cuts a PUT's body into chunks (its ``-maxMB``, 4 MiB by default) and stores
# each on a volume server while it receives the next: after the body's last byte it still
# stores the last chunk. Up to SMALL_PUT_MAX a PUT asks for 2 MiB chunks (``?maxMB=2``):
# a 16 MiB PUT took 86.8 ms against 93.2 with the default (curl -T 94.4), 64 MiB 326 against
# 335; at 256 MiB they were 2% slower, so larger files keep the filer's own (a /tmp script,
# store.put alternating with curl -T, medians of 20 and 8 runs). Reads were no slower.
SMALL_PUT_MAX = 64 * 1024 * 1024
SMALL_PUT_CHUNK_MB = 2
_RETRY_STATUS = (500, 502, 503, 504)
_IDEMPOTENT = frozenset({"GET", "HEAD"})


class _CountingRetry(Retry):
    """urllib3's Retry, tagging the error it gives up on with the attempts made
    (the error urllib3 raises does not carry the Retry that counted them)."""

    def increment(self, *args, **kwargs):
        try:
            return super().increment(*args, **kwargs)
        except Exception as exc:
            exc.slp_attempts = len(self.history) + 1
            raise


class FilerUnavailable(ConnectionError):
    """The filer could not be reached, or a transfer was cut, after ``attempts`` over ``seconds``."""

    def __init__(self, message: str, attempts: int = 1, seconds: float = 0.0):
        super().__init__(message)
        self.attempts = attempts
        self.seconds = seconds


class SeaweedFSFileSystem(AbstractFileSystem):
    """A SeaweedFS filer seen as a filesystem.

    Parameters
    ----------
    filer_url: base URL of the filer, e.g. ``http://127.0.0.1:8888``.
    timeout: seconds to wait to connect and between bytes of a response.
    retries: how many times a failed request is tried again (0: never).
    backoff: seconds; retry n >= 2 waits ``backoff * 2**(n-1)`` plus up to ``backoff``
        of jitter, the first goes at once (urllib3's schedule).
    """

    protocol = ("seaweedfs",)
    root_marker = ""

    def __init__(self, filer_url: str = "http://127.0.0.1:8888", timeout: float = 60.0, retries: int = 5,
                 backoff: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.filer_url = filer_url.rstrip("/")
        # What messages show: a user:password@ in the URL never reaches an error line.
        from ..redaction import strip_url_password

        self.shown_url = strip_url_password(self.filer_url)
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = max(0.0, float(backoff))
        self.session = requests.Session()
        retry = _CountingRetry(
            total=self.retries, connect=self.retries, read=self.retries, status=self.retries, other=0,
            allowed_methods=_IDEMPOTENT, status_forcelist=_RETRY_STATUS, backoff_factor=self.backoff,
            backoff_jitter=self.backoff, backoff_max=30.0, raise_on_status=False,
        )
        adapter = _Adapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def backoff_time(self, attempts: int) -> float:
        """The wait before try ``attempts + 1``, on urllib3's schedule (used where we retry ourselves)."""
        if attempts <= 1:
            return 0.0
        return min(30.0, self.backoff * 2 ** (attempts - 1) + random.random() * self.backoff)

    # -- plumbing -----------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("seaweedfs://"):
            path = path[len("seaweedfs://") :]
        return path.strip("/")

    def _url(self, path: str, trailing_slash: bool = False) -> str:
        path = self._strip_protocol(path)
        url = f"{self.filer_url}/{quote(path)}"
        if trailing_slash and path:
            url += "/"
        return url

    def _call(self, method: str, path: str, *, params=None, trailing_slash=False, ok=(), **kwargs):
        """Send one request to the filer and map its failures to OSError subclasses."""
        url = self._url(path, trailing_slash)
        where = f"/{self._strip_protocol(path)}"
        kwargs.setdefault("timeout", self.timeout)
        t0 = time.monotonic()
        try:
            resp = self.session.request(method, url, params=params, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise self.gave_up(method, where, _attempts_of(exc), time.monotonic() - t0,
                               timed_out=isinstance(exc, requests.Timeout)) from exc
        if resp.status_code < 400 or resp.status_code in ok:
            return resp
        detail = _error_detail(resp)
        history = getattr(getattr(resp.raw, "retries", None), "history", ())
        if history:
            detail += f"; after {len(history) + 1} attempts over {time.monotonic() - t0:.1f} s"
        resp.close()
        if resp.status_code == 404:
            raise FileNotFoundError(where)
        if resp.status_code in (401, 403):
            raise PermissionError(f"{where}: {detail}")
        if resp.status_code == 409:
            raise FileExistsError(where)
        if resp.status_code == 416:
            raise ValueError(f"{where}: range not satisfiable")
        raise OSError(f"SeaweedFS filer {method} {where} failed ({resp.status_code}): {detail}")

    def gave_up(self, method: str, where: str, attempts: int, seconds: float, timed_out: bool = False) -> OSError:
        """The one-line error for a request that failed for good."""
        how = "timed out" if timed_out else "unreachable"
        return FilerUnavailable(f"SeaweedFS filer {how} at {self.shown_url} after {attempts} "
                                f"attempt{'s' if attempts != 1 else ''} over {seconds:.1f} s ({method} {where})",
                                attempts, seconds)

    def _call_replayable(self, method: str, path: str, open_body, **kwargs):
        """``_call`` with a body urllib3 cannot replay (a file being streamed): on a
        connection error or timeout, reopen the body and try again, within the same
        budget of ``retries + 1`` attempts that urllib3's own retries draw from."""
        used, t0 = 0, time.monotonic()
        while True:
            try:
                with open_body() as body:
                    return self._call(method, path, data=body, **kwargs)
            except (ConnectionError, TimeoutError) as exc:
                used += getattr(exc, "attempts", 1)
                if used > self.retries:
                    where = f"/{self._strip_protocol(path)}"
                    raise self.gave_up(method, where, used, time.monotonic() - t0,
                                       isinstance(exc, TimeoutError)) from exc
                time.sleep(self.backoff_time(used))

    # -- metadata -----------------------------------------------------------------

    def _entry_to_info(self, entry: dict) -> dict:
        is_dir = bool(int(entry.get("Mode", 0)) & _MODE_DIR)
        return {
            "name": self._strip_protocol(entry["FullPath"]),
            "size": 0 if is_dir else int(entry.get("FileSize", 0)),
            "type": "directory" if is_dir else "file",
            "mtime": entry.get("Mtime"),
            "created": entry.get("Crtime"),
            "md5": entry.get("Md5"),
        }

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        if path == "":
            return {"name": "", "size": 0, "type": "directory"}
        entry = self._call("GET", path, params={"metadata": "true"}).json()
        return self._entry_to_info(entry)

    def exists(self, path, **kwargs):
        # fsspec's default swallows every error; an unreachable filer must not read as "absent".
        try:
            self.info(path)
            return True
        except FileNotFoundError:
            return False

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        info = self.info(path)
        if info["type"] == "file":
            return [info] if detail else [info["name"]]
        out, last = [], ""
        while True:
            params = {"limit": _LIST_PAGE}
            if last:
                params["lastFileName"] = last
            listing = self._call(
                "GET", path, params=params, trailing_slash=True, headers={"Accept": "application/json"}
            ).json()
            entries = listing.get("Entries") or []
            out.extend(self._entry_to_info(e) for e in entries)
            if not listing.get("ShouldDisplayLoadMore") or not entries:
                break
            last = listing.get("LastFileName") or entries[-1]["FullPath"].rsplit("/", 1)[-1]
        return out if detail else [o["name"] for o in out]

    def modified(self, path):
        return _parse_time(self.info(path)["mtime"])

    def created(self, path):
        return _parse_time(self.info(path)["created"])

    # -- directories --------------------------------------------------------------

    def mkdir(self, path, create_parents=True, **kwargs):
        path = self._strip_protocol(path)
        if not create_parents and not self.exists(self._parent(path)):
            raise FileNotFoundError(self._parent(path))
        self._call("POST", path, trailing_slash=True)

    def makedirs(self, path, exist_ok=False):
        if self.exists(path):
            if not exist_ok:
                raise FileExistsError(path)
            return
        self.mkdir(path)

    def rmdir(self, path):
        if self.ls(path, detail=False):
            raise OSError(f"/{self._strip_protocol(path)}: directory not empty")
        self._call("DELETE", path)

    # -- files --------------------------------------------------------------------

    def cat_file(self, path, start=None, end=None, **kwargs):
        headers = {}
        if start is not None or end is not None:
            size = self.size(path) if (start is not None and start < 0) or (end is not None and end < 0) else None
            start = 0 if start is None else (size + start if start < 0 else start)
            if end is None:
                headers["Range"] = f"bytes={start}-"
            else:
                end = size + end if end < 0 else end
                if end <= start:
                    return b""
                headers["Range"] = f"bytes={start}-{end - 1}"
        resp = self._call("GET", path, headers=headers, ok=(416,))
        if resp.status_code == 416:
            return b""
        return resp.content

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if mode == "create" and self.exists(path):
            raise FileExistsError(path)
        # A whole-file PUT is idempotent: sending it again after a cut is safe.
        self._call_replayable("PUT", path, lambda: contextlib.nullcontext(value))

    def put_file(self, lpath, rpath, callback=DEFAULT_CALLBACK, mode="overwrite", **kwargs):
        if os.path.isdir(lpath):
            self.makedirs(rpath, exist_ok=True)
            return
        if mode == "create" and self.exists(rpath):
            raise FileExistsError(rpath)
        self._put_stream(lpath, rpath, callback, hasher=None)

    def put_file_hashed(self, lpath, rpath, callback=DEFAULT_CALLBACK, sha256=False, proceed=None):
        """``put_file`` that hashes the bytes as they are sent, in the same read: returns
        the :class:`~slp_runner.hashing.FileDigest` of the bytes the filer stored (the
        last attempt's, if a cut upload was sent again). OSError if the filer stored
        another size than was sent.

        ``proceed()`` is called before each block is sent; what it raises stops the
        upload there (the connection is closed part-way, so the filer stores nothing)
        and is raised from here (a ConnectionError or TimeoutError would be retried)."""
        from ..hashing import StreamHasher

        return self._put_stream(lpath, rpath, callback, hasher=lambda: StreamHasher(sha256=sha256, threads=1),
                                proceed=proceed)

    def _put_stream(self, lpath, rpath, callback, hasher, proceed=None):
        size = os.path.getsize(lpath)
        callback.set_size(size)
        sent = []

        def open_body():
            # Reopened for each attempt: a cut PUT is sent again from the first byte
            # (the progress bar is told to take back what it had counted).
            body = _SentReader(lpath, size, callback, hasher() if hasher else None, proceed)
            sent.append(body)
            return body

        # A file object streams with a Content-Length, like `curl -T`.
        params = {"maxMB": str(SMALL_PUT_CHUNK_MB)} if 0 < size <= SMALL_PUT_MAX else None
        resp = self._call_replayable("PUT", rpath, open_body, headers={"Content-Length": str(size)}, params=params)
        stored = _json_or_none(resp)
        if isinstance(stored, dict) and stored.get("size") not in (None, size):
            raise OSError(f"SeaweedFS filer stored {stored['size']} bytes of {size} at /{self._strip_protocol(rpath)}")
        return sent[-1].digest() if hasher else None

    def get_file(self, rpath, lpath, callback=DEFAULT_CALLBACK, outfile=None, **kwargs):
        if hasattr(lpath, "write"):
            outfile = lpath
        elif self.isdir(rpath):
            os.makedirs(lpath, exist_ok=True)
            return
        else:
            os.makedirs(os.path.dirname(os.path.abspath(lpath)), exist_ok=True)
        resp = self._call("GET", rpath, stream=True)
        with resp:
            callback.set_size(int(resp.headers.get("Content-Length", 0)) or None)
            out = outfile if outfile is not None else open(lpath, "wb")
            try:
                for chunk in resp.iter_content(_IO_CHUNK):
                    out.write(chunk)
                    callback.relative_update(len(chunk))
            finally:
                if outfile is None:
                    out.close()

    def rm_file(self, path):
        if not self.exists(path):
            raise FileNotFoundError(path)
        self._call("DELETE", path)

    def _rm(self, path):
        if self.isdir(path):
            self._call("DELETE", path, params={"recursive": "true"})
        else:
            self.rm_file(path)

    def rm(self, path, recursive=False, maxdepth=None):
        if isinstance(path, str) and not self._has_magic(path):
            if not self.exists(path):
                raise FileNotFoundError(path)
            if recursive and maxdepth is None:
                self._call("DELETE", path, params={"recursive": "true"})  # one request for a whole tree
                return
        paths = self.expand_path(path, recursive=recursive, maxdepth=maxdepth)
        # Deepest first, so a recursive delete never finds its directory gone.
        for p in sorted(paths, key=len, reverse=True):
            if self.exists(p):
                self._call("DELETE", p, params={"recursive": "true"} if recursive else None)

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
        """Rename on the filer: atomic, metadata only, overwrites ``path2``."""
        if isinstance(path1, list) or isinstance(path2, list) or self._strip_protocol(path1) == self._strip_protocol(path2):
            return super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)
        src = self._strip_protocol(path1)
        try:
            self._call("POST", path2, params={"mv.from": "/" + src})
        except OSError:
            # One request when it works; the filer says a missing source only in words (400).
            if not self.exists(src):
                raise FileNotFoundError(src) from None
            raise

    def cp_file(self, path1, path2, **kwargs):
        if self.isdir(path1):
            self.makedirs(path2, exist_ok=True)
            return
        resp = self._call("GET", path1, stream=True)
        with resp:
            # A generator body goes out with chunked transfer encoding: nothing is buffered.
            self._call("PUT", path2, data=resp.iter_content(_IO_CHUNK))

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode == "xb":
            if self.exists(path):
                raise FileExistsError(path)
            mode = "wb"
        if mode == "rb" and block_size == 0:
            return _ResponseStream(self, path)
        return SeaweedFSFile(
            self, path, mode=mode, block_size=block_size or _IO_CHUNK, autocommit=autocommit,
            cache_options=cache_options, **kwargs,
        )


    @staticmethod
    def _has_magic(path: str) -> bool:
        return any(c in path for c in "*?[")


def upload_verified(fs: SeaweedFSFileSystem, local_path: str, path, check, *, incoming: str,
                    callback=DEFAULT_CALLBACK, proceed=None) -> None:
    """Send ``local_path`` to the temporary name ``incoming``, hashing the bytes as they
    go out (one read of the file), and rename it to ``path`` only if ``check(digest)``
    passes; otherwise remove it. Two requests: the PUT and the rename (which replaces
    a file at ``path`` and refuses a directory).

    ``path`` may be a callable, asked once ``check`` has passed: the upload can start
    before its caller knows where it goes (before the file's hash is known).
    ``proceed()`` is called before each block is sent; what it raises stops the
    upload part-way (see ``put_file_hashed``), removes ``incoming`` and is raised."""
    try:
        check(fs.put_file_hashed(local_path, incoming, callback=callback, proceed=proceed))
        fs.mv(incoming, path() if callable(path) else path)
    except BaseException:
        # A PUT cut part-way never made an entry; one sent whole did (a check that failed).
        with contextlib.suppress(Exception):
            fs._call("DELETE", incoming, ok=(404,))
        raise


# The store may start this upload before the hash is known, deciding where it goes
# (and whether it is wanted at all) while it runs: the bytes go to a temporary name
# first anyway. An S3 multipart upload is made at its final key, so it cannot.
upload_verified.late_destination = True


class SeaweedFSFile(AbstractBufferedFile):
    """Random-access reads through ``Range``; writes stream out as appends."""

    def _fetch_range(self, start, end):
        if end <= start:
            return b""
        resp = self.fs._call("GET", self.path, headers={"Range": f"bytes={start}-{end - 1}"}, ok=(416,))
        return b"" if resp.status_code == 416 else resp.content

    def _initiate_upload(self):
        self.fs._call("PUT", self.path, data=b"")

    def _upload_chunk(self, final=False):
        data = self.buffer.getvalue()
        if data:
            self.fs._call("PUT", self.path, params={"op": "append"}, data=data)
        return True


class _ResponseStream(io.RawIOBase):
    """A streamed HTTP response body as a read-only file: ``read(n)`` hands back
    urllib3's bytes without another copy (what ``block_size=0`` opens).

    The GET is sent by the first ``read`` (a missing file raises FileNotFoundError
    there), from the position ``seek`` set: ``Range: bytes=n-``, which is how a reader
    resumes after the connection dropped; a later ``seek`` sends a new ranged GET.
    A cut stream raises ``ConnectionError`` (``TimeoutError`` if the filer went
    silent), never short data.
    """

    def __init__(self, fs: SeaweedFSFileSystem, path: str):
        self._fs = fs
        self._path = path
        self._pos = 0
        self._resp = None
        self._raw = None

    def _request(self) -> None:
        headers = {"Range": f"bytes={self._pos}-"} if self._pos else {}
        self._resp = self._fs._call("GET", self._path, headers=headers, stream=True, ok=(416,))
        self._raw = self._resp.raw
        self._raw.decode_content = True

    def open(self) -> int | None:
        """Send the GET now (FileNotFoundError if there is no such file); the whole
        file's size from the answer's headers, None where they do not say it. An
        answer with the whole file to a ranged GET (a proxy that drops ``Range``) has
        the bytes before the position read and dropped."""
        if self._resp is not None:
            return None
        self._request()
        headers, status = self._resp.headers, self._resp.status_code
        total = headers.get("Content-Range", "").rpartition("/")[2]
        if status in (206, 416):
            return int(total) if total.isdigit() else None
        if self._pos:  # the Range was ignored
            left = self._pos
            while left:
                left -= len(self._raw_read(min(left, _IO_CHUNK), self._pos - left, short=True))
        length = headers.get("Content-Length", "")
        return int(length) if length.isdigit() else None

    def _drop_response(self) -> None:
        if self._resp is not None:
            self._resp.close()
        self._resp = self._raw = None

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, offset, whence=io.SEEK_SET):
        if whence != io.SEEK_SET:
            raise io.UnsupportedOperation("only absolute seeks (a new ranged GET)")
        if offset != self._pos:
            self._drop_response()
            self._pos = offset
        return self._pos

    def read(self, n=-1):
        if self._resp is None:
            self.open()
        if self._resp.status_code == 416:  # at or past the end: nothing left to read
            return b""
        data = self._raw_read(None if n is None or n < 0 else n, self._pos)
        self._pos += len(data)
        return data

    def _raw_read(self, n: int | None, at: int, short: bool = False) -> bytes:
        """``n`` bytes of the body (all, for None) read at byte ``at``; a cut one raises
        ConnectionError (TimeoutError if the filer went silent). ``short``: so does an
        answer that ends before ``n``."""
        try:
            data = self._raw.read(n)
        except (Urllib3HTTPError, requests.RequestException, OSError) as exc:
            # urllib3 reports a cut body (fewer bytes than Content-Length) as ProtocolError.
            self._drop_response()
            timed_out = isinstance(exc, (ReadTimeoutError, TimeoutError))
            err, how = (TimeoutError, "went silent") if timed_out else (ConnectionError, "dropped the connection")
            raise err(f"SeaweedFS filer at {self._fs.shown_url} {how} at byte {at} "
                      f"(GET /{self._fs._strip_protocol(self._path)})") from exc
        if short and not data:
            self._drop_response()
            raise ConnectionError(f"SeaweedFS filer at {self._fs.shown_url} ended its answer at byte {at} "
                                  f"(GET /{self._fs._strip_protocol(self._path)})")
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self):
        if not self.closed:
            self._drop_response()
        super().close()


class StreamedRead:
    """A read of ``path`` from byte ``offset`` as one streamed GET (``Backend.open_reader``):
    made, it has sent the GET and has its answer, so a missing file has raised
    FileNotFoundError and ``size`` (the whole file's) is known before a byte is read;
    ``stream(sink)`` hands the body on in pieces of ``chunk`` bytes, ``close()`` drops it."""

    def __init__(self, fs: SeaweedFSFileSystem, path: str, offset: int = 0, *, chunk: int = _IO_CHUNK):
        self._body = _ResponseStream(fs, path)
        self._body.seek(offset)
        self._chunk = chunk
        try:
            size = self._body.open()
            # Headers that do not say it (a proxy's chunked answer, a 416 without Content-Range).
            self.size = size if size is not None else int(fs.info(path)["size"])
        except BaseException:
            self._body.close()
            raise

    def stream(self, sink) -> None:
        with self._body as body:
            while chunk := body.read(self._chunk):
                sink(chunk)

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> StreamedRead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _SentReader:
    """A file as a request body: at most ``size`` bytes (a file growing meanwhile sends
    no more than its Content-Length), each read told to an fsspec callback and, with a
    hasher, hashed as it goes out. ``proceed()``, if given, is called before each read
    that has bytes left to send: what it raises ends the upload with the body short
    (urllib3 closes the connection), so the filer makes no entry of it. A file that
    ends before ``size`` (cut short meanwhile) ends the upload so too, with an
    IntegrityError naming it: the filer would otherwise wait for the missing bytes
    until its read timeout and answer 500.

    Each read fills one reused buffer and hands out a view of it: urllib3's request()
    sends each block (``body_to_chunks``) before it reads the next, so the bytes sent
    are the bytes hashed, with no new 1 MiB object per block (about 10 ms less client
    CPU per 256 MiB, which shows in the wall time when the filer on the same machine
    keeps both cores busy)."""

    def __init__(self, path, size, callback, hasher=None, proceed=None):
        self._path = path
        self._block = memoryview(bytearray(min(size, _SEND_BLOCK)))
        self._size = self._left = size
        self._callback = callback
        self._hasher = hasher
        self._proceed = proceed
        self._sent = 0
        self._f = open(path, "rb", buffering=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and self._sent:
            self._callback.relative_update(-self._sent)  # this attempt's bytes are sent again
        self._f.close()

    def read(self, n=-1):
        if not self._left or n == 0:
            return b""
        if self._proceed is not None:  # not after the last byte: the filer has it all
            self._proceed()
        n = len(self._block) if n is None or n < 0 else n
        got = self._f.readinto(self._block[:min(n, self._left, len(self._block))])
        if not got:
            raise IntegrityError(f"{self._path} changed while it was being stored (it ended after "
                                 f"{self._sent} of {self._size} bytes); nothing was published")
        data = self._block[:got]
        self._left -= got
        self._sent += got
        if self._hasher is not None:
            self._hasher.update(data)
        self._callback.relative_update(got)
        return data

    def __len__(self):
        return self._size

    def digest(self):
        return self._hasher.digest()


class _Adapter(HTTPAdapter):
    """requests' adapter, reading streamed bodies ``_SEND_BLOCK`` bytes at a time."""

    def init_poolmanager(self, *args, **kwargs):
        kwargs.setdefault("blocksize", _SEND_BLOCK)
        super().init_poolmanager(*args, **kwargs)


def _attempts_of(exc: requests.RequestException) -> int:
    """How many attempts urllib3 made before ``exc`` (tagged by _CountingRetry)."""
    inner = exc.args[0] if exc.args else None
    return getattr(inner, "slp_attempts", None) or getattr(exc, "slp_attempts", None) or 1


def _json_or_none(resp: requests.Response):
    try:
        return resp.json()
    except ValueError:
        return None


def _error_detail(resp: requests.Response) -> str:
    try:
        return str(resp.json().get("error", "")) or resp.reason
    except ValueError:
        return (resp.text or resp.reason or "").strip()[:200]


def _parse_time(value: str | None) -> datetime:
    if not value:
        raise ValueError("no timestamp")
    # Go's RFC3339Nano: trim nanoseconds to microseconds for fromisoformat.
    head, _, frac = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00" if frac else f"{head}+00:00")
