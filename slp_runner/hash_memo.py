"""What this machine last hashed a local file to, keyed by the file's identity and stat
(device, inode, size, mtime, ctime), as DVC's state database keys its md5s.

A put uses it as a hint only: it lets a filer put look the hash up before it has read
the file, so that a file put before is not sent again. It is never trusted: a put that
finds a sound object under a remembered hash hashes the file before it deduplicates
against that object, and one that sends the file publishes it under the hash of the
bytes it sent. A record that is stale, edited or unreadable costs time, never a wrong
answer; writing one that fails (a read-only or full disk) is not an error either.

One small JSON file per file put, ``<cache_dir>/put-hashes/<device>-<inode>.json``, replaced atomically.
A record holds the file's :func:`~slp_runner.hashing.file_version`, the stat the
verified cache trusts its entries by. At most KEEP are kept, the most recently
written (each put rewrites its record), and what a killed write left goes after an hour.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from .hashing import OID_RE, file_version

MEMO_DIR = "put-hashes"  # in the cache folder
KEEP = 4096  # records, about 16 MiB of disk blocks at most; the oldest go first
_RECORD = re.compile(r"[0-9a-f]+-[0-9a-f]+\.json")
_TEMP = ".memo-"
# Temporary files: this module's, and those of its first version (<record>.<pid>-<thread>.tmp).
_TEMPS = re.compile(r"\.memo-.*|[0-9a-f]+-[0-9a-f]+\.json\.[0-9]+-[0-9]+\.tmp")


class HashMemo:
    def __init__(self, root: str):
        self.root = root

    def _path(self, st: os.stat_result) -> str:
        return os.path.join(self.root, f"{st.st_dev:x}-{st.st_ino:x}.json")

    def recall(self, st: os.stat_result) -> str | None:
        """The hash remembered for the file with this stat, or None."""
        try:
            with open(self._path(st), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(record, dict) or record.get("version") != file_version(st):
            return None
        oid = record.get("blake3")
        return oid if isinstance(oid, str) and OID_RE.fullmatch(oid) else None

    def remember(self, st: os.stat_result, oid: str) -> None:
        """Record that the file with this stat hashed to ``oid`` (best effort)."""
        from .local_output import keep_newest, temp_name

        tmp = temp_name(self.root, _TEMP)
        try:
            os.makedirs(self.root, exist_ok=True)
            with open(tmp, "x", encoding="utf-8") as f:
                json.dump({"version": file_version(st), "blake3": oid}, f)
            os.replace(tmp, self._path(st))
            keep_newest(self.root, _RECORD, _TEMPS, KEEP)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
