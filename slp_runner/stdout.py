"""Standard output whose write errors say what failed.

``slp task=ls > /dev/full`` or a full disk under a redirect would otherwise end in a
traceback (or, at exit, ``Exception ignored`` and status 120), and a reader that went
away (``slp task=ls | head -1``) the same. :func:`guard` puts ``sys.stdout`` on a raw
writer that turns such an error into :class:`StdoutError` and points descriptor 1 at
``/dev/null``, so the text still buffered, and the interpreter's last flush, go
nowhere instead of failing again.
"""

from __future__ import annotations

import errno
import io
import os
import sys

from .errors import OutputError


class StdoutError(OutputError):
    """Standard output cannot be written. ``closed``: its reader went away (EPIPE),
    which a command line tool ends on quietly, as one the kernel stopped with SIGPIPE."""

    def __init__(self, exc: OSError):
        super().__init__(f"cannot write to standard output: {exc.strerror or exc}")
        self.closed = exc.errno == errno.EPIPE


class _Stdout(io.RawIOBase):
    def __init__(self, fd: int):
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return os.isatty(self._fd)

    def write(self, data) -> int:
        try:
            return os.write(self._fd, data)
        except BlockingIOError:  # a non-blocking descriptor: BufferedWriter waits and retries
            raise
        except OSError as exc:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._fd)
            os.close(devnull)
            raise StdoutError(exc) from None


def guard() -> None:
    """Put ``sys.stdout`` (descriptor 1) on the raw writer above, keeping its encoding,
    error handler and buffering. Anything else (a test's capture) is left alone."""
    out = sys.stdout
    if not isinstance(out, io.TextIOWrapper) or isinstance(getattr(out.buffer, "raw", None), _Stdout):
        return
    try:
        if out.fileno() != 1:
            return
        out.flush()
    except (OSError, ValueError):
        return
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(_Stdout(1)), encoding=out.encoding, errors=out.errors,
                                  newline="\n", line_buffering=out.line_buffering, write_through=out.write_through)


def ended(exc: StdoutError) -> SystemExit:
    """How a command ends on a stdout error: quietly with 141 (128 + SIGPIPE, a shell's
    status for a writer whose reader left) or with its one line and 1."""
    if not exc.closed:
        print(f"slp: error: {exc}", file=sys.stderr)
        return SystemExit(1)
    return SystemExit(141)
