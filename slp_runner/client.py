"""The ``slp`` command's front end: hand the command line to a resident slp process.

Python needs about half a second to import what a transfer uses (OmegaConf, fsspec,
requests, slp itself) before the first byte moves: as long as ``curl`` takes to move
256 MiB. So, as Mercurial's ``chg`` does for ``hg``, ``slp`` keeps one process per
user and installation (:mod:`.server`) that has imported all that once, and this
module, which imports only the standard library, asks it to run each command line in
a fresh fork of itself (a *worker*). The worker gets this process's standard input,
output and error (the descriptors themselves, passed over the socket), its working
folder, environment, umask, resource limits, niceness, CPU affinity and ignored
signals, and runs ``slp_runner.cli.main`` exactly as this process would. Signals sent
to this process are passed on to the worker (a terminal's Ctrl-C, SIGTERM, ...), and
this process ends the way the worker ended: the same exit status, or killed by the
same signal. If this process is killed (SIGKILL), its worker is killed too.

No server: the command runs here, in this process, and a server is started in the
background for the next one (first use, after it idled out, after the package or
Python changed). The server is specific to what could make a fork differ from a new
process: the interpreter, its flags and ``PYTHON*`` variables, the locale, the user's
groups, resource hard limits, control group and namespaces; a client that differs in
any of them gets a server of its own. A server whose loaded modules changed on disk
(an upgrade, an edit) exits at the next command, which then runs here.

``SLP_SERVER=off`` runs every command here. ``SLP_SERVER_DIR`` moves the sockets
(default ``$XDG_RUNTIME_DIR/slp-runner``, else ``/tmp/slp-runner-<uid>``); the folder
must belong to the user and be closed to others, since the environment (credentials
included) travels over the socket. ``SLP_SERVER_IDLE``: seconds a server waits for a
command before it exits (default 900). ``slp --start-server`` starts this
installation's server and waits until it answers (a job script's warm-up, a
benchmark); ``slp --stop-server`` stops every slp server of the user's in that folder
(each stops listening at once and exits when the commands it runs have finished).
"""

from __future__ import annotations

import os
import sys

OFF = ("off", "0", "false", "no")
# Signals passed on to the worker. SIGTSTP (Ctrl-Z) stops the worker, then this process.
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGWINCH", "SIGCONT")
# Signals whose being ignored (nohup, a background job's SIGINT) the worker inherits.
INHERITED_IGNORED = FORWARDED + ("SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGPIPE", "SIGXFSZ")
MAGIC = b"SLP1"
PING = b"PING"  # same length: answered by a monitor, which runs nothing
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with its NUL
_client_pid: int | None = None  # set in a server's worker: the pid of the slp the user started


def command_pid() -> int:
    """The pid of the ``slp`` process the user started (``$!``, what ``task=runs`` shows
    and a user would signal): this process's, or in a server's worker its client's."""
    return _client_pid or os.getpid()


def main() -> None:
    argv = sys.argv[1:]
    if argv == ["--stop-server"]:
        sys.exit(stop_server())
    if argv == ["--start-server"]:
        sys.exit(start_server())
    path = socket_path() if os.environ.get("SLP_SERVER", "").lower() not in OFF else None
    if path is not None:
        outcome = run_in_server(path)
        if outcome is not None:
            exit_like(outcome)
        spawn_server(path)
    run_here()


def run_here() -> None:
    from .cli import main as cli_main

    cli_main()


# -- where the server listens --------------------------------------------------------------


def server_folder() -> str:
    setting = os.environ.get("SLP_SERVER_DIR")
    if setting:
        return os.path.abspath(os.path.expanduser(setting))
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "slp-runner")
    return f"/tmp/slp-runner-{os.getuid()}"


def private_folder(folder: str) -> bool:
    """A folder of this user that nobody else may write to (as ``ssh`` treats its keys)."""
    import stat

    try:
        st = os.stat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def server_key() -> str:
    """What a fork of a server must share with a new process of this client to behave
    the same: a client that differs in any of it gets a server of its own."""
    import resource

    try:
        from _blake2 import blake2b  # hashlib itself loads OpenSSL: 5 ms
    except ImportError:
        from hashlib import blake2b

    parts = [sys.executable, sys.prefix, sys.version, os.path.dirname(os.path.abspath(__file__)), repr(sys.flags),
             repr(sorted(sys._xoptions.items())), repr(sys.path[1:]), repr(sys.warnoptions),
             repr((os.getgid(), sorted(os.getgroups()))),
             repr(os.getpriority(os.PRIO_PROCESS, 0))]  # a worker cannot be less nice than its server
    parts += sorted(f"{k}={v}" for k, v in os.environ.items()
                    if k.startswith(("PYTHON", "FSSPEC_", "LC_")) or k in ("LANG", "TZ"))
    parts += [repr(resource.getrlimit(getattr(resource, name))[1]) for name in sorted(dir(resource))
              if name.startswith("RLIMIT_")]
    for what in ("/proc/self/cgroup", "/proc/self/ns/mnt", "/proc/self/ns/net", "/proc/self/ns/pid",
                 "/proc/self/ns/user", "/proc/self/ns/ipc", "/proc/self/ns/uts"):
        try:
            parts.append(os.readlink(what) if "/ns/" in what else open(what).read())
        except OSError:
            parts.append("-")
    return blake2b("\0".join(parts).encode(), digest_size=8).hexdigest()


def socket_path() -> str | None:
    """This client's server socket, or None where there can be none (the folder is not
    private, or the path is too long for a Unix socket)."""
    folder = server_folder()
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        return None
    if not private_folder(folder):
        return None
    path = os.path.join(folder, f"{server_key()}.sock")
    return path if len(os.fsencode(path)) <= SOCKET_PATH_MAX else None


# -- asking the server -----------------------------------------------------------------------


def _peer_uid(sock) -> int:
    import _socket

    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # struct ucred: pid, uid, gid
    return int.from_bytes(creds[4:8], sys.byteorder)


def connect(path: str):
    """A connection to the server at ``path`` run by this user, or None. (``_socket``,
    not ``socket``: this module must start in milliseconds.)"""
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
        if _peer_uid(sock) != os.getuid():
            raise OSError("the server socket belongs to another user")
    except OSError:
        sock.close()
        return None
    return sock


def send_fds(sock, data: bytes, fds: list[int]) -> None:
    import _socket

    rights = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])


# Messages both ways are length-prefixed ``marshal`` frames of plain dicts (both ends are
# the same Python: the server's key names its interpreter).


def send_frame(sock, message: dict) -> None:
    import marshal

    body = marshal.dumps(message)
    sock.sendall(len(body).to_bytes(4, "big") + body)


def recv_exactly(sock, n: int) -> bytes | None:
    """``n`` bytes, or None at end-of-file before them."""
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock) -> dict | None:
    """The next message, or None if the other end closed first."""
    import marshal

    head = recv_exactly(sock, 4)
    body = recv_exactly(sock, int.from_bytes(head, "big")) if head else None
    if body is None:
        return None
    message = marshal.loads(body)
    if not isinstance(message, dict):
        raise ValueError("not an slp message")
    return message


def request() -> dict:
    """What the worker takes from this process, besides the three standard descriptors."""
    import resource
    signal = _signal_module()

    umask = os.umask(0o022)
    os.umask(umask)
    stdio = []
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        stdio.append([getattr(stream, "encoding", None), getattr(stream, "errors", None),
                      bool(getattr(stream, "line_buffering", False))])
    ignored = [name for name in INHERITED_IGNORED
               if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) == signal.SIG_IGN]
    return {
        "pid": os.getpid(),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "umask": umask,
        "rlimits": {name: resource.getrlimit(getattr(resource, name))[0]
                    for name in dir(resource) if name.startswith("RLIMIT_")},
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "affinity": sorted(os.sched_getaffinity(0)),
        "ignored": ignored,
        "stdio": stdio,
    }


def run_in_server(path: str) -> dict | None:
    """Run this command line in the server's worker: how the worker ended (``exit`` or
    ``signal``), or None if there is no server to take it (then run it here)."""
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)  # a closed standard descriptor: run here, as Python would (checked
    except OSError:       # before the socket is made, which would take the free number)
        return None
    sock = connect(path)
    if sock is None:
        return None
    try:
        message = request()
    except OSError:
        sock.close()
        return None
    forwarder = Forwarder()  # from here on, a signal is for the command, wherever it runs
    try:
        send_fds(sock, MAGIC, [0, 1, 2])
        send_frame(sock, message)
        first = recv_frame(sock) or {}
        if "pid" not in first:  # stale (it exits) or refused: here, then
            forwarder.restore(deliver_pending=True)
            return None
        forwarder.start(first["pid"])
        ending = recv_frame(sock) or {}
    except Abandoned as stop:  # a stop signal before the worker's pid came: end as it says
        return {"signal": stop.signum}  # (the server sees the hang-up and kills a worker)
    except (OSError, ValueError, EOFError, TypeError):  # marshal: EOFError, ValueError, TypeError
        if forwarder.pid is not None:  # the worker ran: do not run the command twice
            return {"exit": 255, "lost": True}
        forwarder.restore(deliver_pending=True)
        return None
    finally:
        forwarder.restore()
        sock.close()
    if "exit" not in ending and "signal" not in ending:
        return {"exit": 255, "lost": True}
    return ending


class Abandoned(Exception):
    """A stop signal came before the worker's pid did: the wait for the server ends
    (a stopped or stuck server must not make ``slp`` deaf to Ctrl-C and SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _signal_module():
    """``signal`` without its enums: ``_signal``, the C module that ``signal`` wraps
    (importing ``signal`` itself, with ``enum``, took 12 ms of this process's ~35).
    Handlers compare with ``==`` either way (``signal``'s are IntEnums)."""
    try:
        import _signal

        return _signal
    except ImportError:  # not CPython
        import signal

        return signal


# Signals that end a process by default: before the worker is known, they end the wait.
STOPPING = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")


class Forwarder:
    """Pass the signals this process gets on to the worker while it runs. Before its
    pid is known, a stopping signal abandons the command (:class:`Abandoned`); others
    are held and passed on once it is known (or delivered here, if the command runs
    here after all). SIGTSTP stops the worker with SIGSTOP: the worker's process group
    is the server's, orphaned, where the kernel discards a SIGTSTP."""

    def __init__(self):
        signal = _signal_module()

        self.pid: int | None = None
        self.saved, self.pending = {}, []
        for name in FORWARDED + ("SIGTSTP",):
            sig = getattr(signal, name, None)
            if sig is None or signal.getsignal(sig) == signal.SIG_IGN:
                continue  # ignored here: the worker ignores it too
            self.saved[sig] = signal.signal(sig, self.on_signal)

    def start(self, pid: int) -> None:
        self.pid = pid
        while self.pending:
            self.on_signal(self.pending.pop(0), None)

    def on_signal(self, signum, frame) -> None:
        signal = _signal_module()

        if self.pid is None:
            if any(getattr(signal, name, None) == signum for name in STOPPING):
                raise Abandoned(signum)
            self.pending.append(signum)
            return
        try:
            os.kill(self.pid, signal.SIGSTOP if signum == signal.SIGTSTP else signum)
        except ProcessLookupError:
            return
        if signum == signal.SIGTSTP:  # the worker stopped: stop here too, until SIGCONT
            os.kill(os.getpid(), signal.SIGSTOP)

    def restore(self, deliver_pending: bool = False) -> None:
        signal = _signal_module()

        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.saved = {}
        if deliver_pending:
            for sig in self.pending:
                signal.raise_signal(sig)
            self.pending = []


def exit_like(ending: dict) -> None:
    """End this process as the worker ended."""
    signal = _signal_module()

    usage_file = os.environ.get("SLP_WORKER_RUSAGE")
    if usage_file and "maxrss_kib" in ending:  # for benchmarks: the worker's own peak RSS
        with open(usage_file, "w") as f:
            f.write(f'{{"maxrss_kib": {int(ending["maxrss_kib"])}}}\n')
    if ending.get("lost"):
        os.write(2, b"slp: error: the slp server stopped while running this command (see SLP_SERVER)\n")
    if "signal" in ending:
        sig = int(ending["signal"])
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        sys.exit(128 + sig)
    # Nothing of this process's is left to tear down (the worker wrote the output, on
    # descriptors of its own): end without the interpreter's finalization (~4 ms of ~30).
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(ending["exit"]))


# -- starting and stopping the server ------------------------------------------------------

# The server's own environment: what imports and locale need, never credentials (each
# worker gets its client's whole environment, for that command only).
SERVER_ENV = ("PATH", "HOME", "LANG", "TZ", "TMPDIR", "XDG_RUNTIME_DIR", "XDG_CACHE_HOME", "SLP_SERVER_IDLE",
              "VIRTUAL_ENV")


def spawn_server(path: str) -> None:
    """Start a server for ``path`` in the background, detached; it gives up at once if
    another is already starting there."""
    import subprocess

    env = {k: v for k, v in os.environ.items()
           if k in SERVER_ENV or k.startswith(("PYTHON", "FSSPEC_", "LC_"))}
    try:
        subprocess.Popen([sys.executable, "-m", "slp_runner.server", path], env=env, cwd="/",
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    except OSError:
        pass  # no server: every command runs in its own process, as with SLP_SERVER=off


def wait_for_server(path: str, timeout: float = 30.0) -> bool:
    """Start the server for ``path`` unless one answers, and wait until one does."""
    import time

    deadline = time.monotonic() + timeout
    spawned = False
    while time.monotonic() < deadline:
        if ping(path):
            return True
        if not spawned:
            spawn_server(path)
            spawned = True
        time.sleep(0.05)
    return False


def ping(path: str) -> bool:
    """Does a server that is not stale answer on ``path``?"""
    sock = connect(path)
    if sock is None:
        return False
    try:
        sock.sendall(PING)
        return recv_frame(sock) == {"pong": True}
    except (OSError, ValueError, EOFError, TypeError):
        return False
    finally:
        sock.close()


def server_pid(path: str) -> int | None:
    try:
        with open(path + ".pid") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def start_server() -> int:
    """``slp --start-server``: a server that answers, started unless one runs."""
    if os.environ.get("SLP_SERVER", "").lower() in OFF:
        print("slp: error: SLP_SERVER is off: commands run in their own processes", file=sys.stderr)
        return 1
    path = socket_path()
    if path is None:
        print(f"slp: error: no server can listen in {server_folder()}: it must be this user's, closed to "
              f"others, and short enough for a socket path (SLP_SERVER_DIR moves it)", file=sys.stderr)
        return 1
    if not wait_for_server(path):
        print(f"slp: error: the server did not answer on {path} within 30 s", file=sys.stderr)
        return 1
    print(f"slp: server ready (pid {server_pid(path)})")
    return 0


def stop_server() -> int:
    """``slp --stop-server``: stop every slp server of this user in the server folder
    (one per Python, locale, limits, ...: see :func:`server_key`)."""
    signal = _signal_module()
    import time

    folder = server_folder()
    stopped = []
    if private_folder(folder):
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".sock"):
                continue
            path = os.path.join(folder, name)
            pid, sock = server_pid(path), connect(path)
            if sock is None or pid is None:
                continue
            sock.close()
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            stopped.append((pid, path))
    for pid, path in stopped:
        for _ in range(200):
            if not os.path.exists(path):
                break
            time.sleep(0.05)
        print(f"slp: stopped the server (pid {pid})")
    if not stopped:
        print("slp: no server running")
    return 0
