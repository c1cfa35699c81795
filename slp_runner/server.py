"""The resident slp process that ``slp`` hands its command lines to (see :mod:`.client`).

``python -m slp_runner.server <socket>``, started by a client, detached:

1. takes ``<socket>.lock`` (one server per socket: another that is starting gives up),
   imports what commands use (:data:`PRELOAD`), and watches each loaded module's file
   (:mod:`.file_watch`);
2. listens on ``<socket>`` (mode 0600, in a folder closed to others) and accepts only
   its own user (``SO_PEERCRED``);
3. per connection, checks that no loaded module changed on disk (else it answers
   ``stale`` and exits: the client runs the command itself and starts a new server),
   then forks a *worker* and goes back to listening. The server never reads a
   request: a client's environment and credentials reach only the worker of that one
   command;
4. the worker reads the request, takes on the client's working folder, environment,
   umask, resource limits, niceness, CPU affinity, standard descriptors and ignored
   signals, tells the client its pid (for signals), runs ``slp_runner.cli.main``,
   closes the client's descriptors and tells it the exit code and its peak RSS. The
   server watches each worker (a pidfd) and its client's connection: a worker killed
   or gone by ``os._exit`` is reported by the server; a client that goes away (killed)
   takes its worker with it, and a server that dies takes its workers (the client
   then says the command was lost);
5. retires after ``SLP_SERVER_IDLE`` seconds (default 900) without a command, when
   its socket was removed or replaced, when its code is stale, or on SIGTERM
   (``slp --stop-server``): it stops listening and releases its lock at once, and
   exits once the commands it runs have finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import os
import select
import signal
import socket
import sys
import time

from . import client
from .file_watch import FileWatch

# What commands import: loaded once here, shared by every worker.
PRELOAD = ("slp_runner.cli", "slp_runner.compose", "slp_runner.tasks", "slp_runner.commands", "slp_runner.store",
           "slp_runner.cache", "slp_runner.backends", "slp_runner.backends.seaweedfs", "slp_runner.app",
           "omegaconf", "fsspec", "requests", "filelock", "blake3", "orjson",
           "fsspec.implementations.local", "s3fs", "slp_runner.backends.s3_multipart", "hydra", "ctypes",
           "slp_runner.refs", "slp_runner.stdout", "difflib")
IDLE_DEFAULT = 900.0
CHECK_EVERY = 30.0  # seconds between checks that the socket is still this server's
SPARE_AFTER = 0.2  # seconds without an event before a new spare worker is forked


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0]
    folder = os.path.dirname(path)
    if not client.private_folder(folder):
        return 1
    lock = _take_lock(path + ".lock")
    if lock is None:
        return 0  # another server has it
    _call_self(b"slp-server")
    _preload()
    _warm_up()
    watched = FileWatch(_module_files())
    idle = _idle_seconds(os.environ.get("SLP_SERVER_IDLE"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by a server that was killed: the lock says none runs
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(64)
    identity = os.stat(path).st_ino
    with open(path + ".pid", "w") as f:
        f.write(f"{os.getpid()}\n")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    gc.freeze()  # what is loaded now stays shared with the forks (copy-on-write)
    try:
        _serve(listener, lock, path, identity, watched, idle)
    finally:
        _leave(listener, path, identity)
    return 0


def _idle_seconds(setting: str | None) -> float:
    """``SLP_SERVER_IDLE``: a positive number of seconds, else the default."""
    import math

    try:
        seconds = float(setting) if setting else IDLE_DEFAULT
    except ValueError:
        return IDLE_DEFAULT
    return seconds if math.isfinite(seconds) and seconds > 0 else IDLE_DEFAULT


def _take_lock(lock_path: str, wait: float = 5.0):
    """The server lock, waiting a little for a stale server that is still exiting."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


def _preload() -> None:
    for name in PRELOAD:
        with contextlib.suppress(Exception):  # an extra that is not installed
            importlib.import_module(name)


def _warm_up() -> None:
    """Parse every interpolation the shipped configs hold: OmegaConf's grammar (ANTLR)
    builds its lookahead tables lazily, per process, on the first strings it sees,
    which cost each worker about 15 ms to build again."""
    import yaml
    from omegaconf import OmegaConf

    def walk(value) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and "${" in value:
            with contextlib.suppress(Exception):
                OmegaConf.create({"value": value})

    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
    for folder, _, names in os.walk(conf):
        for name in names:
            if name.endswith(".yaml"):
                with contextlib.suppress(Exception), open(os.path.join(folder, name)) as f:
                    walk(yaml.safe_load(f))


def _module_files() -> list[str]:
    """The files of every module loaded now: a change to any makes this server stale."""
    files = {getattr(module, "__file__", None) for module in list(sys.modules.values())}
    return sorted(f for f in files if f and os.path.exists(f))


def _still_ours(path: str, identity: int) -> bool:
    try:
        return os.stat(path).st_ino == identity
    except OSError:
        return False


def _leave(listener, path: str, identity: int) -> None:
    """Stop listening: the socket and pid file go (if still this server's)."""
    if _still_ours(path, identity):
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.unlink(path + ".pid")
    listener.close()


def _serve(listener, lock: int, path: str, identity: int, watched, idle: float) -> None:
    """Accept commands and watch their workers until idle, replaced or stale. A
    client's connection is watched for its hang-up only (``POLLRDHUP``): the bytes on
    it are its worker's to read. A *spare* worker, forked ahead of time, waits for the
    next connection, so that a command need not wait for a fork (about 10 ms here)."""
    running: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (worker pid, its client's connection)
    by_conn: dict[int, int] = {}  # connection fd -> pidfd, while its client is there
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    last = time.monotonic()

    def fork_worker(conn=None):
        """A worker for ``conn``, or a spare (``conn`` None) waiting for one:
        ``(pid, channel to hand it a connection)``."""
        server, (ours, theirs) = os.getpid(), socket.socketpair()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                listener.close()
                os.close(lock)  # a worker must never keep a killed server's lock
                watched.close()
                ours.close()
                for fd, (_, other) in running.items():
                    os.close(fd)
                    other.close()
                _die_with(server)
                if conn is None:  # a spare: wait for the connection
                    _, fds, _, _ = socket.recv_fds(theirs, 1, 1)
                    if not fds:
                        os._exit(0)  # the server is gone or retired it
                    conn = socket.socket(fileno=fds[0])
                theirs.close()
                code = _worker(conn, server)
            finally:
                os._exit(code)
        theirs.close()
        return pid, ours

    # SIGTERM (slp --stop-server) and staleness retire the server: it stops listening
    # and lets go of its lock at once (a new server may start), and exits once the
    # commands it runs have finished: they are never cut short by it.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    stop = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    poller.register(wake_r, select.POLLIN)
    listening = True

    def retire():
        nonlocal listening, spare
        if listening:
            listening = False
            poller.unregister(listener)
            _leave(listener, path, identity)
            os.close(lock)
            if spare is not None:
                spare[1].close()  # the spare reads end-of-file and exits
                spare = None

    def fork_spare():
        signal.set_wakeup_fd(-1)  # not the children's: they have their own signals
        try:
            return fork_worker()
        finally:
            signal.set_wakeup_fd(wake_w)

    spare = fork_spare()
    try:
        while listening or running:
            # A new spare is forked once things are quiet, not while a command starts.
            timeout = (SPARE_AFTER * 1000 if spare is None and listening
                       else None if running else min(CHECK_EVERY, idle) * 1000)
            events = poller.poll(timeout)
            if running:
                last = time.monotonic()
            if stop:
                retire()
            if not events:
                if listening and spare is None:
                    spare = fork_spare()
                elif time.monotonic() - last >= idle or not _still_ours(path, identity):
                    retire()
                continue
            for fd, _event in events:
                if fd == wake_r:
                    with contextlib.suppress(OSError):
                        os.read(wake_r, 512)
                elif listening and fd == listener.fileno():
                    conn = _accept(listener, watched)
                    if conn is None:
                        retire()  # stale: the next command starts a new server
                        continue
                    if not conn:
                        continue
                    pid, channel = spare or (None, None)
                    try:
                        if channel is None:
                            raise OSError("no spare")
                        socket.send_fds(channel, [b"C"], [conn.fileno()])
                    except OSError:  # none ready, or it died: a worker of its own, then
                        if pid:
                            with contextlib.suppress(ChildProcessError):
                                os.waitpid(pid, os.WNOHANG)
                        signal.set_wakeup_fd(-1)
                        try:
                            pid, own = fork_worker(conn)
                        finally:
                            signal.set_wakeup_fd(wake_w)
                        own.close()
                    if channel is not None:
                        channel.close()
                    pidfd = os.pidfd_open(pid)
                    running[pidfd] = (pid, conn)
                    poller.register(pidfd, select.POLLIN)
                    poller.register(conn, select.POLLRDHUP)
                    by_conn[conn.fileno()] = pidfd
                    spare = None
                elif fd in running:  # a worker ended
                    pid, conn = running.pop(fd)
                    poller.unregister(fd)
                    if by_conn.pop(conn.fileno(), None) is not None:
                        poller.unregister(conn)
                    os.close(fd)
                    _, status, usage = os.wait4(pid, 0)
                    _report_end(conn, status, usage)
                elif fd in by_conn:  # a client hung up (killed): its worker goes too
                    pidfd = by_conn.pop(fd)
                    poller.unregister(fd)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(running[pidfd][0], signal.SIGKILL)
    finally:
        if spare is not None:
            spare[1].close()  # the spare reads end-of-file and exits
            with contextlib.suppress(ChildProcessError):
                os.waitpid(spare[0], 0)
        signal.set_wakeup_fd(-1)


def _accept(listener, watched):
    """The next client's connection; False if there is none to serve, None if this
    server is stale (it answers ``stale`` and exits)."""
    try:
        conn, _ = listener.accept()
    except OSError:
        return False
    if client._peer_uid(conn) != os.getuid():
        conn.close()
        return False
    if watched.changed():
        with contextlib.suppress(OSError):
            _reply(conn, {"stale": True})
        conn.close()
        return None
    return conn


def _report_end(conn, status: int, usage) -> None:
    """Tell the client how its worker ended. A worker that finished its command told it
    already (this line then goes unread); one that was killed or left by ``os._exit``
    did not."""
    ending: dict = {"maxrss_kib": usage.ru_maxrss}
    if os.WIFSIGNALED(status):
        ending["signal"] = os.WTERMSIG(status)
    else:
        ending["exit"] = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(OSError):
        _reply(conn, ending)
    conn.close()


# -- one command -----------------------------------------------------------------------------


def _receive(conn) -> tuple[dict, list[int]] | None:
    """The request and the client's three standard descriptors; None for a ping."""
    magic, fds, _, _ = socket.recv_fds(conn, len(client.MAGIC), 3)
    if magic == client.PING and not fds:
        _reply(conn, {"pong": True})
        return None
    if magic != client.MAGIC or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("not an slp client")
    try:
        message = client.recv_frame(conn)
    except (EOFError, TypeError) as exc:
        raise ValueError(f"not an slp request: {exc}") from None
    if message is None:
        raise ValueError("the client went away")
    return message, fds


def _reply(conn, message: dict) -> None:
    client.send_frame(conn, message)


def _take_on(message: dict) -> None:
    """This process becomes the client's, as far as a fork can: raises OSError or
    ValueError where it cannot (the client then runs the command itself)."""
    import resource

    os.chdir(message["cwd"])
    os.environ.clear()
    os.environ.update(message["env"])
    time.tzset()
    os.umask(int(message["umask"]))
    for name, soft in message["rlimits"].items():
        which = getattr(resource, name, None)
        if which is None:
            continue
        current_soft, hard = resource.getrlimit(which)
        if soft != current_soft:
            if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
                raise ValueError(f"{name} above this server's hard limit")
            resource.setrlimit(which, (soft, hard))
    nice = int(message["nice"])
    if nice != os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, nice)  # lower than the server's needs privilege: OSError
    os.sched_setaffinity(0, message["affinity"])


def _worker(conn, server: int) -> int:
    """One command, in a fork of the server: read the request, become the client's
    process as far as a fork can, say so (the pid, for signals), run it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        received = _receive(conn)
    except (OSError, ValueError):
        return 0
    if received is None:
        return 0
    message, fds = received
    try:
        _take_on(message)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        with contextlib.suppress(OSError):
            _reply(conn, {"refused": str(exc)})
        return 0
    _die_with(server)
    _call_self(b"slp")
    try:
        _reply(conn, {"pid": os.getpid()})
    except OSError:
        return 1
    _work(message, fds, conn)  # never returns
    return 1


def _prctl(option: int, arg) -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, arg)


def _die_with(parent: int) -> None:
    """Be killed if the server dies (the client then says the command was lost): no
    worker runs on unseen, writing to a terminal whose ``slp`` has exited."""
    PR_SET_PDEATHSIG = 1
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the call
        os._exit(1)


def _call_self(name: bytes) -> None:
    """The name ``ps``, ``top`` and ``pkill`` see (the kernel's ``comm``): ``slp`` for a
    worker running a command, as its client is called; ``slp-server`` for the server."""
    PR_SET_NAME = 15
    _prctl(PR_SET_NAME, name)


def _work(message: dict, fds: list[int], conn) -> None:
    """The worker: the client's standard streams and ignored signals, then ``slp``;
    then the streams are closed and the client told the exit code at once (the
    client's caller need not wait for this process to be torn down)."""
    code = 1
    try:
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        _signals(set(message["ignored"]))
        _streams(message["stdio"])
        sys.argv = list(message["argv"])
        client._client_pid = int(message["pid"])
        code = _run_cli()
    except BaseException:  # noqa: BLE001 - a worker must end with os._exit, never return
        with contextlib.suppress(BaseException):
            sys.excepthook(*sys.exc_info())
    finally:
        import resource

        for fd in (0, 1, 2):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(BaseException):
            _reply(conn, {"exit": code, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
        os._exit(code)


def _signals(ignored: set[str]) -> None:
    signal.set_wakeup_fd(-1)
    for name in client.INHERITED_IGNORED + ("SIGCHLD",):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        if name in ignored:
            signal.signal(sig, signal.SIG_IGN)
        elif name == "SIGINT":
            signal.signal(sig, signal.default_int_handler)
        elif name in ("SIGPIPE", "SIGXFSZ"):
            signal.signal(sig, signal.SIG_IGN)  # what Python itself sets at start
        else:
            signal.signal(sig, signal.SIG_DFL)


def _streams(stdio: list) -> None:
    """New ``sys.stdin``/``stdout``/``stderr`` on descriptors 0-2, as the client's were."""
    import io

    streams = []
    for fd, (encoding, errors, line_buffering), mode in zip((0, 1, 2), stdio, ("r", "w", "w")):
        buffered = io.open(fd, mode + "b", closefd=False)
        streams.append(io.TextIOWrapper(buffered, encoding=encoding, errors=errors, newline="\n",
                                        line_buffering=line_buffering, write_through=fd == 2))
    sys.stdin, sys.stdout, sys.stderr = streams
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams


def _run_cli() -> int:
    """``slp_runner.cli.main`` as a new process would run it: SystemExit's code, a
    traceback for an uncaught error, then non-daemon threads joined, ``atexit``
    handlers run and the streams flushed."""
    import atexit
    import threading

    code = 0
    try:
        from .cli import main as cli_main

        cli_main()
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - as the interpreter: traceback, exit 1
        sys.excepthook(*sys.exc_info())
        code = 1
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown:
        shutdown()
    atexit._run_exitfuncs()
    return code if _finish() else 120


def _finish() -> bool:
    ok = True
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            ok = False
    return ok


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
