"""Errors a user of slp-runner can see.

Every error here is meant to be shown as a single line that names the culprit
(a hash, a path, a URL, a line number), so the CLI prints ``str(exc)`` and exits
non-zero without a traceback::

    SlpError
    ├── InvalidHash          a hash that is not 64 lowercase hex characters
    ├── InputError           a local input that cannot be used
    │   ├── NotGGUF          a "model" whose magic bytes are not GGUF
    │   └── BadJSONL         a JSONL line that is not a JSON object (with line number)
    ├── OutputError          a local file that cannot be written (full disk, no
    │                        permission), naming the path and the bytes it needed
    ├── ArtifactNotFound     no object under that hash in the backend
    ├── IntegrityError       bytes whose BLAKE3 does not match the expected hash
    ├── BackendError         the backend failed or cannot be reached (names the URL)
    ├── ConfigError          an unknown backend, task or missing setting
    ├── PipelineError        a stage graph that cannot run (cycle, dangling reference,
    │                        unknown target), named by stage
    ├── RunFailed            a run that finished with a failed stage or was interrupted
    ├── NotAbandoned         a staging run folder whose owner is not provably gone
    └── EngineError          the inference engine cannot start, died, or is unreachable

    Interrupted              (a KeyboardInterrupt, not an SlpError) a stop signal

Backend modules raise built-in ``OSError`` subclasses, as fsspec filesystems do;
the store turns those into the errors above at its edge (:func:`one_line` for a
library's message that spans several lines). One exception: the filer's upload
raises IntegrityError from inside the request body when the local file is cut short
(an OSError there would be taken by urllib3 for a dropped connection and retried).
"""

from __future__ import annotations

import signal


class SlpError(Exception):
    """Base class of every error slp-runner reports to a user."""


class InvalidHash(SlpError, ValueError):
    pass


class InputError(SlpError):
    pass


class NotGGUF(InputError):
    pass


class BadJSONL(InputError):
    pass


class OutputError(SlpError):
    pass


class ArtifactNotFound(SlpError, FileNotFoundError):
    pass


class IntegrityError(SlpError):
    pass


class BackendError(SlpError):
    pass


class ConfigError(SlpError):
    pass


class PipelineError(SlpError):
    pass


class RunFailed(SlpError):
    pass


class EngineError(SlpError):
    pass


class NotAbandoned(SlpError):
    pass


def one_line(exc: BaseException) -> str:
    """``str(exc)`` as one line that keeps the reason. Some libraries put a heading that
    ends in ``:`` first and the reasons below it (botocore's ParamValidationError:
    ``Parameter validation failed:`` then one line per invalid parameter): the first
    line alone would say nothing, so the heading and every reason are joined."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return lines[0]


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised in the main thread. A KeyboardInterrupt, so every
    path that handles Ctrl-C (mark the run interrupted, stop the engine, remove temporary
    files) handles the others alike; ``signum`` says which one came."""

    def __init__(self, signum: int = signal.SIGINT):
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)
