"""The resident slp server (slp_runner/server.py, slp_runner/client.py), with real
``slp`` processes: a command run by the server's worker ends exactly as it does in its
own process, takes on the client's folder, environment, umask and limits, gets its
signals, dies with its client, and the server holds no client's credentials, refuses
folders others can write to, replaces itself when its code changes and idles out."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from test_cli import SLP
from conftest import TEST_CONF
from seaweed_cluster import default_signals

TESTS = ["hydra.searchpath=[file://" + TEST_CONF + "]"]


@pytest.fixture
def folder():
    path = tempfile.mkdtemp(prefix="slp-t-")  # short: a socket path holds 107 bytes
    yield path
    for pid in server_pids(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(tmp_path, folder):
    e = dict(os.environ)
    e.update(SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"),
             SLP_COMPOSE_CACHE=str(tmp_path / "compose"), SLP_SERVER_DIR=folder,
             SLP_WORKER_RUSAGE=str(tmp_path / "rusage.json"))
    e.pop("SLP_SERVER", None)
    return e


def server_pids(folder) -> list[int]:
    pids = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(open(os.path.join(folder, name)).read()))
    return [p for p in pids if psutil.pid_exists(p)]


_default_signals = default_signals


def slp(env, *args, cwd=None, preexec_fn=_default_signals):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(env["SLP_WORKER_RUSAGE"])
    return subprocess.run([SLP, *args], env=env, capture_output=True, text=True, cwd=cwd, timeout=120,
                          preexec_fn=preexec_fn)


def start(env, *args, preexec_fn=_default_signals):
    return subprocess.Popen([SLP, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)


def in_server(env) -> bool:
    """Did the last command run in a server's worker (which reports its peak RSS)?"""
    return os.path.exists(env["SLP_WORKER_RUSAGE"])


def gone(proc: psutil.Process) -> bool:
    """Exited: reaped, or a zombie (which its parent may reap while this looks)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def serve(env) -> int:
    """Have a server answer this env's commands; its pid."""
    started = slp(env, "--start-server")
    assert started.returncode == 0, started.stderr
    pid = int(re.fullmatch(r"slp: server ready \(pid (\d+)\)\n", started.stdout).group(1))
    assert slp(env, "--version").returncode == 0 and in_server(env)
    return pid


def workers(server_pid: int) -> list[psutil.Process]:
    """The server's workers that run a command: its children in a client's folder (a
    spare one, forked ahead for the next command, is still in the server's, /)."""
    found = []
    for child in psutil.Process(server_pid).children():
        with contextlib.suppress(psutil.Error):
            if child.cwd() != "/":
                found.append(child)
    return found


@pytest.mark.parametrize("args", [
    ["--version"],
    ["task=ls"],
    ["backend=nope"],                                    # a config error: exit 2, one line
    ["task=get", "hash=" + "ab" * 32],                   # a task error: exit 1, one line
    ["task=ls", "backend.timeout=x", "backend=local"],   # a key the backend does not have
])
def test_a_command_ends_in_the_server_as_in_its_own_process(env, args):
    serve(env)
    served = slp(env, *args)
    assert in_server(env)
    alone = slp({**env, "SLP_SERVER": "off"}, *args)
    assert not in_server({**env})
    assert (served.returncode, served.stdout, served.stderr) == (alone.returncode, alone.stdout, alone.stderr)


def test_the_worker_takes_the_clients_folder_environment_and_umask(env, tmp_path):
    serve(env)
    work = tmp_path / "work"
    work.mkdir()
    (work / "blob.bin").write_bytes(os.urandom(70_000))

    def umask_077():
        _default_signals()
        os.umask(0o077)

    put = slp(env, "task=put", "kind=blob", "path=blob.bin", cwd=work, preexec_fn=umask_077)
    assert put.returncode == 0, put.stderr
    assert in_server(env)
    store = tmp_path / "store"  # SLP_STORE_ROOT, read from the client's environment
    stored = [os.path.join(d, n) for d, _, names in os.walk(store) for n in names if n.endswith(".bin")]
    assert len(stored) == 1 and os.path.getsize(stored[0]) == 70_000
    for d, _, names in os.walk(store):
        for n in names:
            assert not os.stat(os.path.join(d, n)).st_mode & 0o077, n  # the client's umask


def test_a_resource_limit_of_the_client_holds_in_the_worker(env, tmp_path):
    serve(env)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(3 << 20))
    put = slp(env, "task=put", "kind=blob", f"path={blob}", "format=json")
    assert put.returncode == 0, put.stderr
    oid = __import__("json").loads(put.stdout)["hash"]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def small_files():  # the soft limit only: the hard one would ask for a server of its own
        _default_signals()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))

    got = slp(env, "task=get", f"hash={oid}", preexec_fn=small_files)
    assert in_server(env)
    assert got.returncode == 1
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slp: error: no space left writing blob"), got.stderr
    assert not os.path.exists(tmp_path / "cache") or not [
        n for _, _, names in os.walk(tmp_path / "cache") for n in names if n.endswith((".bin", ".partial"))]
    again = slp(env, "task=get", f"hash={oid}")
    assert again.returncode == 0 and in_server(env)


def _slow_run(env, tmp_path, preexec_fn=_default_signals):
    runs = tmp_path / "runs"
    proc = start(env, *TESTS, "pipeline=slow", f"runner.runs_dir={runs}", preexec_fn=preexec_fn)
    staging = runs / ".staging"
    wait_for(lambda: staging.is_dir() and os.listdir(staging), what="the run's staging folder")
    return proc


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_signal_to_the_client_reaches_the_worker(env, tmp_path, sig, code):
    server = serve(env)
    proc = _slow_run(env, tmp_path)
    (worker,) = wait_for(lambda: workers(server), what="the worker")
    assert (worker.name(), psutil.Process(server).name()) == ("slp", "slp-server")  # as ps, top and pkill see them
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"slp: interrupted ({signal.Signals(sig).name})"
    assert gone(worker)
    listing = slp(env, "task=runs", f"runner.runs_dir={tmp_path / 'runs'}")
    assert "interrupted" in listing.stdout, listing.stdout  # finalized by the worker, as in-process


def test_an_ignored_signal_stays_ignored_in_the_worker(env, tmp_path):
    serve(env)

    def ignore_sigint():
        _default_signals()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job

    proc = _slow_run(env, tmp_path, preexec_fn=ignore_sigint)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143


def test_killing_the_client_kills_its_worker(env, tmp_path):
    server = serve(env)
    proc = _slow_run(env, tmp_path)
    (worker,) = wait_for(lambda: workers(server), what="the worker")
    proc.kill()
    proc.communicate(timeout=30)
    wait_for(lambda: not workers(server), timeout=10, what="the worker to go")
    assert gone(worker)
    listing = slp(env, "task=runs", f"runner.runs_dir={tmp_path / 'runs'}")
    assert "abandoned" in listing.stdout and f"pid {proc.pid} on" in listing.stdout  # its lock went with it


def test_the_client_ends_as_its_worker_ended(env, tmp_path):
    server = serve(env)
    proc = _slow_run(env, tmp_path)
    (worker,) = wait_for(lambda: workers(server), what="the worker")
    worker.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_the_run_records_the_pid_the_user_started(env, tmp_path):
    serve(env)
    proc = _slow_run(env, tmp_path)
    listing = slp(env, "task=runs", f"runner.runs_dir={tmp_path / 'runs'}")
    assert f"pid {proc.pid}" in listing.stdout, listing.stdout
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)


def test_a_killed_server_takes_its_command_and_the_client_says_so_then_is_replaced(env, tmp_path):
    server = serve(env)
    proc = _slow_run(env, tmp_path)
    (worker,) = wait_for(lambda: workers(server), what="the worker")
    os.kill(server, signal.SIGKILL)  # as the OOM killer would
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 255
    assert err.strip().splitlines()[-1] == "slp: error: the slp server stopped while running this command (see SLP_SERVER)"
    wait_for(lambda: gone(worker), timeout=10,
             what="the worker to die with its server")
    after = slp(env, "--version")  # the socket is left; nobody listens: run here, start another
    assert after.returncode == 0 and not in_server(env)
    listing = slp(env, "task=runs", f"runner.runs_dir={tmp_path / 'runs'}")
    assert "abandoned" in listing.stdout  # killed, so listed as such: nothing pretends it finished
    assert wait_for(lambda: [p for p in server_pids(env["SLP_SERVER_DIR"]) if p != server], what="a new server")


def test_the_server_holds_no_credentials_and_its_socket_is_private(env, tmp_path):
    secret = "sEcReT-" + os.urandom(6).hex()
    env.update(AWS_SECRET_ACCESS_KEY=secret, AWS_ACCESS_KEY_ID="AKIA" + secret)
    server = serve(env)
    assert slp(env, "task=ls").returncode == 0 and in_server(env)
    with open(f"/proc/{server}/environ", "rb") as f:
        assert secret.encode() not in f.read()
    with open(f"/proc/{server}/cmdline", "rb") as f:
        assert secret.encode() not in f.read()
    folder = env["SLP_SERVER_DIR"]
    assert os.stat(folder).st_mode & 0o777 == 0o700
    (sock,) = [n for n in os.listdir(folder) if n.endswith(".sock")]
    assert os.stat(os.path.join(folder, sock)).st_mode & 0o777 == 0o600


def test_a_folder_others_may_write_to_is_not_used(env, tmp_path):
    os.chmod(env["SLP_SERVER_DIR"], 0o777)
    for _ in range(2):
        got = slp(env, "task=ls")
        assert got.returncode == 0 and not in_server(env)
    time.sleep(0.5)
    assert os.listdir(env["SLP_SERVER_DIR"]) == []


def test_a_server_whose_code_changed_is_replaced(env, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("# loaded by both the client and the server\n")
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(site)
    old = serve(env)
    (site / "sitecustomize.py").write_text("# loaded by both the client and the server, now edited\n")
    got = slp(env, "--version")
    assert got.returncode == 0 and not in_server(env)  # the old code is not run
    wait_for(lambda: not psutil.pid_exists(old), what="the stale server to exit")
    assert serve(env) != old


def test_an_idle_server_exits(env):
    env["SLP_SERVER_IDLE"] = "1"
    pid = serve(env)
    wait_for(lambda: not psutil.pid_exists(pid), timeout=10, what="the idle server to exit")
    assert [n for n in os.listdir(env["SLP_SERVER_DIR"]) if not n.endswith(".lock")] == []


def test_concurrent_commands_share_one_server(env, tmp_path):
    serve(env)
    files = []
    for i in range(4):
        path = tmp_path / f"b{i}.bin"
        path.write_bytes(os.urandom(200_000 + i))
        files.append(path)
    procs = [start(env, "task=put", "kind=blob", f"path={p}") for p in files]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "hash=" in out
    assert len(server_pids(env["SLP_SERVER_DIR"])) == 1


def test_stop_server_stops_every_server_in_the_folder(env):
    pid = serve(env)
    other = serve({**env, "LC_CTYPE": "C.UTF-8"})  # another locale: a server of its own
    assert other != pid
    got = slp(env, "--stop-server")
    assert got.returncode == 0
    assert sorted(got.stdout.splitlines()) == sorted(f"slp: stopped the server (pid {p})" for p in (pid, other))
    wait_for(lambda: not psutil.pid_exists(pid) and not psutil.pid_exists(other), timeout=10,
             what="the servers to stop")
    again = slp(env, "--stop-server")
    assert again.stdout.strip() == "slp: no server running"


def test_a_stale_or_stopped_server_lets_running_commands_finish(env, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("# loaded by both the client and the server\n")
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(site)
    env["SLP_SERVER_IDLE"] = "x"  # not a number: the default, not a crash
    old = serve(env)
    runs = tmp_path / "runs"
    quick = start(env, *TESTS, "pipeline=slow", "+stages.wait.params.seconds=3", f"runner.runs_dir={runs}")
    wait_for(lambda: workers(old), what="the worker")
    (site / "sitecustomize.py").write_text("# edited while a command runs\n")
    assert slp(env, "--version").returncode == 0 and not in_server(env)  # stale: not run by it
    new = wait_for(lambda: [p for p in server_pids(env["SLP_SERVER_DIR"]) if p != old], what="a new server")
    assert new
    stopped = slp(env, "--stop-server")
    assert stopped.returncode == 0
    _, err = quick.communicate(timeout=60)
    assert quick.returncode == 0, err  # finished, not cut short by either
    wait_for(lambda: not psutil.pid_exists(old), timeout=15, what="the retired server to exit")


def test_a_stop_signal_before_the_worker_starts_ends_the_wait(env):
    pid = serve(env)
    os.kill(pid, signal.SIGSTOP)  # a stuck server: it accepts nothing
    try:
        # (not to pipes: the descriptors it passed stay in flight, in the socket the
        # stopped server has not accepted, until that server runs again)
        proc = subprocess.Popen([SLP, "--version"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=_default_signals)
        time.sleep(1.0)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        os.kill(pid, signal.SIGCONT)


def test_ctrl_z_stops_the_worker_and_sigcont_resumes_it(env, tmp_path):
    server = serve(env)
    proc = _slow_run(env, tmp_path)
    (worker,) = wait_for(lambda: workers(server), what="the worker")
    proc.send_signal(signal.SIGTSTP)
    wait_for(lambda: worker.status() == psutil.STATUS_STOPPED, timeout=10, what="the worker to stop")
    # A shell sends SIGCONT (fg) only once it saw its job stop: the client stops itself
    # just after the worker, and a SIGCONT before that would leave it stopped for good.
    client = psutil.Process(proc.pid)
    wait_for(lambda: client.status() == psutil.STATUS_STOPPED, timeout=10, what="the client to stop")
    proc.send_signal(signal.SIGCONT)
    wait_for(lambda: worker.status() != psutil.STATUS_STOPPED, timeout=10, what="the worker to resume")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143


def test_a_closed_stdout_is_not_the_socket(env):
    got = subprocess.run(f"{SLP} task=ls >&-", shell=True, env=env, capture_output=True, text=True, timeout=60)
    alone = subprocess.run(f"{SLP} task=ls >&-", shell=True, env={**env, "SLP_SERVER": "off"}, capture_output=True,
                           text=True, timeout=60)
    assert (got.returncode, got.stderr) == (alone.returncode, alone.stderr)
