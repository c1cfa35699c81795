"""A standard output that cannot be written, through the server and in a command's own
process: a full device (``> /dev/full``) is one ``slp: error:`` line and exit 1; a
reader that went away (``slp task=ls | head -1``) ends the command quietly with 141,
as a process the kernel stopped with SIGPIPE. Never a traceback, never the
interpreter's ``Exception ignored`` and 120."""

from __future__ import annotations

import os
import subprocess

import pytest

from test_cli import SLP
from test_server import _default_signals, env, folder, in_server, serve  # noqa: F401  (fixtures)

MODES = ["server", "own process"]


def run_into(env, stdout, *args):
    return subprocess.run([SLP, *args], env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=_default_signals)


def in_mode(env, mode):
    if mode == "server":
        serve(env)
        return env
    return {**env, "SLP_SERVER": "off"}


@pytest.fixture
def listing(env, tmp_path):
    """A store with three artifacts, for ``task=ls`` to list."""
    for i in range(3):
        blob = tmp_path / f"b{i}.bin"
        blob.write_bytes(os.urandom(1000 + i))
        put = subprocess.run([SLP, "task=put", "kind=blob", f"path={blob}"], env={**env, "SLP_SERVER": "off"},
                             capture_output=True, text=True, timeout=120)
        assert put.returncode == 0, put.stderr
    return env


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["task=ls"], ["task=ls", "format=json"]])
def test_a_full_device_is_one_line_and_exit_1(listing, mode, args):
    env = in_mode(listing, mode)
    with open("/dev/full", "w") as full:
        done = run_into(env, full, *args)
    assert (mode == "server") == in_server(env)
    assert done.returncode == 1
    assert done.stderr == "slp: error: cannot write to standard output: No space left on device\n"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("args", [["--help"], ["task=ls"]])
def test_a_reader_that_left_ends_the_command_quietly_with_141(listing, mode, args):
    env = in_mode(listing, mode)
    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before anything is written: every write fails with EPIPE
    try:
        done = run_into(env, write_end, *args)
    finally:
        os.close(write_end)
    assert (mode == "server") == in_server(env)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.parametrize("mode", MODES)
def test_a_task_that_failed_still_says_why_when_stdout_is_full(listing, mode):
    env = in_mode(listing, mode)
    with open("/dev/full", "w") as full:
        done = run_into(env, full, "task=get", "hash=" + "ab" * 32)
    assert done.returncode == 1
    assert done.stderr.startswith("slp: error: no artifact with hash " + "ab" * 32)
    assert done.stderr.count("\n") == 1
