"""Has any of these files changed since we looked? Asked before every command a
server runs (:mod:`.server`), so it must cost nothing when nothing changed.

On Linux the kernel says so: the folders holding the files are watched with inotify
(``inotify_simple``), and a question only drains the events queued since the last
one. An event is queued before the write that causes it returns, so a command typed
after an edit sees it. Files whose folder cannot be watched (no inotify, the
watch limit reached) are compared by size and modification time instead, as all are
once the kernel dropped events (queue overflow).
"""

from __future__ import annotations

import contextlib
import os

try:
    from inotify_simple import INotify, flags
except ImportError:  # not Linux, or not installed: sizes and times only
    INotify = flags = None


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class FileWatch:
    def __init__(self, paths):
        self.seen = {path: _stat(path) for path in paths}
        self.unwatched: list[str] = list(self.seen)
        self.names: dict[int, set[str]] = {}  # watch descriptor -> file names in its folder
        self.inotify = None
        self.changed_already = False
        if INotify is None:
            return
        with contextlib.suppress(OSError):
            self.inotify = INotify(nonblocking=True)
        if self.inotify is None:
            return
        mask = (flags.MODIFY | flags.ATTRIB | flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM
                | flags.CREATE | flags.DELETE | flags.DELETE_SELF | flags.MOVE_SELF)
        folders: dict[str, set[str]] = {}
        for path in self.seen:
            folders.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))
        self.unwatched = []
        for folder, names in folders.items():
            try:
                self.names.setdefault(self.inotify.add_watch(folder, mask), set()).update(names)
            except OSError:  # ENOSPC: the user's watch limit
                self.unwatched += [os.path.join(folder, name) for name in names]

    def changed(self) -> bool:
        """True once any file changed, moved or went away since this watch began."""
        if self.changed_already:
            return True
        if self.inotify is not None:
            try:
                events = self.inotify.read(timeout=0)
            except OSError:
                events, self.changed_already = [], True
            for event in events:
                if event.mask & (flags.Q_OVERFLOW | flags.DELETE_SELF | flags.MOVE_SELF | flags.IGNORED):
                    self.changed_already = True
                elif event.name in self.names.get(event.wd, ()):
                    self.changed_already = True
            if self.changed_already:  # and the dropped events' files: all by their stat
                return True
        self.changed_already = any(_stat(path) != self.seen[path] for path in self.unwatched)
        return self.changed_already

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
