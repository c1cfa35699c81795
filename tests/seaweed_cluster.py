"""A SeaweedFS cluster of SEPARATE processes (master, volume, filer) on loopback, for
tests that kill one of them: ``weed server`` runs all three in one process, so a
volume server cannot die alone there.

Each process gets its own session (``killpg`` reaches only it), its own log and
data folder under ``base``; every wait is bounded; ``stop()`` kills everything
with SIGKILL (the data is throwaway). The volume server can be killed with
SIGKILL and restarted on the same port and data folder: its volumes come back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid

import requests

from slp_runner.seaweed_server import _port_free, free_ports, weed_binary

LOOPBACK = "127.0.0.1"


class SeaweedCluster:
    def __init__(self, base: str):
        self.base = os.path.abspath(base)
        ports = free_ports()  # four HTTP ports whose gRPC twins (+10000) are free too
        self.master_port, self.volume_port, self.filer_port = ports.master, ports.volume, ports.filer
        self.procs: dict[str, subprocess.Popen] = {}
        for name in ("master", "volume", "filer"):
            os.makedirs(self.dir(name), exist_ok=True)

    def dir(self, name: str) -> str:
        return os.path.join(self.base, name)

    @property
    def master_url(self) -> str:
        return f"http://{LOOPBACK}:{self.master_port}"

    @property
    def volume_url(self) -> str:
        return f"http://{LOOPBACK}:{self.volume_port}"

    @property
    def filer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.filer_port}"

    # -- commands (flags as in `weed <cmd> -h` of weed 4.48) --------------------------

    def _command(self, name: str) -> list[str]:
        weed, ip = weed_binary(), [f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}"]
        master = f"-master={LOOPBACK}:{self.master_port}"
        if name == "master":
            return [weed, "master", *ip, f"-port={self.master_port}", f"-mdir={self.dir('master')}",
                    "-peers=none", "-volumeSizeLimitMB=1024", "-telemetry=false"]
        if name == "volume":
            return [weed, "volume", *ip, f"-port={self.volume_port}", f"-dir={self.dir('volume')}", master,
                    "-max=0", "-preStopSeconds=0", "-minFreeSpace=1GiB"]
        if name == "filer":
            return [weed, "filer", *ip, f"-port={self.filer_port}", master,
                    f"-defaultStoreDir={self.dir('filer')}",
                    f"-localSocket={os.path.join(self.dir('filer'), 'filer.sock')}"]
        raise ValueError(name)

    def _spawn(self, name: str) -> subprocess.Popen:
        for port in getattr(self, f"{name}_port"), getattr(self, f"{name}_port") + 10000:
            _wait(lambda: _port_free(port), 15, f"{name} port {port} to be free")
        with open(os.path.join(self.base, f"{name}.log"), "ab") as log:
            proc = subprocess.Popen(self._command(name), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.dir(name), start_new_session=True,
                                    preexec_fn=default_signals)
        self.procs[name] = proc
        return proc

    # -- life cycle -----------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "SeaweedCluster":
        try:
            self._spawn("master")
            self._wait_up("master", lambda: requests.get(f"{self.master_url}/cluster/status", timeout=2).ok, timeout)
            self.start_volume(timeout)
            self._spawn("filer")
            self._wait_up("filer", self._filer_takes_a_put, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_volume(self, timeout: float = 60.0) -> None:
        """Start (or restart) the volume server and wait until the master can assign
        a file id on it and it answers on its own port."""
        self._spawn("volume")
        self._wait_up("volume", self._volume_ready, timeout)

    def kill_volume(self) -> None:
        """SIGKILL the volume server (no goodbye to the master) and reap it."""
        self._kill("volume")

    def stop(self) -> None:
        for name in ("filer", "volume", "master"):
            self._kill(name)

    def _kill(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    # -- readiness ------------------------------------------------------------------

    def _wait_up(self, name: str, probe, timeout: float) -> None:
        proc = self.procs[name]

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"weed {name} exited with code {proc.returncode}; see {self.base}/{name}.log")
            try:
                return bool(probe())
            except (requests.RequestException, ValueError):
                return False

        _wait(ready, timeout, f"weed {name} to be ready (see {self.base}/{name}.log)")

    def _volume_ready(self) -> bool:
        if not requests.get(f"{self.volume_url}/status", timeout=2).ok:
            return False
        nodes = requests.get(f"{self.master_url}/dir/status", timeout=2).json()
        registered = f"{LOOPBACK}:{self.volume_port}" in str(nodes)
        return registered and bool(requests.get(f"{self.master_url}/dir/assign", timeout=2).json().get("fid"))

    def _filer_takes_a_put(self) -> bool:
        path = f"{self.filer_url}/.probe/{uuid.uuid4().hex}"
        if not requests.put(path, data=b"probe" * 1000, timeout=5).ok:
            return False
        return requests.get(path, timeout=5).content == b"probe" * 1000

    def volume_bytes(self) -> int:
        """Bytes in the volume server's data folder (its .dat files grow as chunks land)."""
        total = 0
        for entry in os.scandir(self.dir("volume")):
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat().st_size
        return total


def default_signals() -> None:
    """For a child's preexec_fn: SIGINT, SIGTERM and SIGHUP back to their defaults (a
    test run in the background may have inherited them ignored; slp must see them)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _wait(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)
