"""slp_runner/file_watch.py on real files: an edit, a rename over, a removal or a touch
is seen; a neighbour's change is not; the same with inotify and without it."""

from __future__ import annotations

import os

import pytest

from slp_runner import file_watch
from slp_runner.file_watch import FileWatch


@pytest.fixture(params=["inotify", "stat"])
def watch_of(request, monkeypatch):
    if request.param == "stat":
        monkeypatch.setattr(file_watch, "INotify", None)
    elif file_watch.INotify is None:
        pytest.fail("inotify_simple is a dependency on Linux: it should be installed")
    made = []

    def make(paths):
        made.append(FileWatch([str(p) for p in paths]))
        if request.param == "inotify":
            assert made[-1].inotify is not None and not made[-1].unwatched
        return made[-1]
    yield make
    for w in made:
        w.close()


@pytest.fixture
def files(tmp_path):
    paths = [tmp_path / "a.py", tmp_path / "b.py", tmp_path / "other.txt"]
    for p in paths:
        p.write_text("x = 1\n")
    return paths


def test_nothing_changed(watch_of, files):
    w = watch_of(files[:2])
    assert not w.changed()
    files[2].write_text("a neighbour, not watched\n")
    (files[0].parent / "new.py").write_text("")
    assert not w.changed()


def test_an_edit_is_seen_and_stays_seen(watch_of, files):
    w = watch_of(files[:2])
    files[0].write_text("x = 22\n")
    assert w.changed()
    assert w.changed()


def test_a_file_renamed_over_is_seen(watch_of, files, tmp_path):
    w = watch_of(files[:2])
    new = tmp_path / "b.py.new"
    new.write_text("y = 2\n")
    os.replace(new, files[1])
    assert w.changed()


def test_a_removal_is_seen(watch_of, files):
    w = watch_of(files[:2])
    files[1].unlink()
    assert w.changed()


def test_a_touch_is_seen(watch_of, files):
    w = watch_of(files[:2])
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert w.changed()
