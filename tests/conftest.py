"""Shared fixtures: one real SeaweedFS (filer + S3 gateway) per test session, on free ports."""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest

from slp_runner import backends
from slp_runner.cache import LocalCache
from slp_runner.seaweed_server import SeaweedServer, free_ports
from slp_runner.store import ArtifactStore

BACKEND_NAMES = ["local", "seaweedfs", "s3"]
# Volumes a test weed may make: each new bucket grows 7, and weed's own default derives
# the count from free disk space (a few dozen on a fuller disk: then "No writable volumes").
TEST_MAX_VOLUMES = 700
TEST_CONF = os.path.join(os.path.dirname(__file__), "conf")  # test pipelines (cycle, failing, ...)
EXAMPLE_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "slp_runner", "examples", "prompts.jsonl")


@pytest.fixture(scope="session", autouse=True)
def slp_servers():
    """Every ``slp`` a test runs goes through a server (slp_runner/server.py), as a user's
    does, in a folder of this session's (short: a socket path must fit in 107 bytes),
    and the servers started there are stopped when the session ends."""
    import shutil
    import signal
    import tempfile

    from slp_runner.client import server_pid

    folder = tempfile.mkdtemp(prefix="slp-srv-")
    os.environ["SLP_SERVER_DIR"] = folder
    yield folder
    for name in os.listdir(folder):
        if name.endswith(".sock.pid"):
            pid = server_pid(os.path.join(folder, name[: -len(".pid")]))
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real config with Hydra's compose API, pointed at this test's folders."""
    from hydra import compose, initialize_config_dir

    from slp_runner.app import CONF_DIR

    def make(*overrides):
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            return compose("config", overrides=[
                f"hydra.searchpath=[file://{TEST_CONF}]",
                f"backend.root={tmp_path / 'store'}", f"cache_dir={tmp_path / 'cache'}",
                f"runner.runs_dir={tmp_path / 'runs'}", f"prompts.path={EXAMPLE_PROMPTS}", *overrides,
            ])
    return make


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    server = SeaweedServer(str(tmp_path_factory.mktemp("seaweed")), free_ports(), max_volumes=TEST_MAX_VOLUMES)
    server.start()
    yield server
    server.stop(timeout=2)  # throwaway data: no need to wait out weed's 15 s gRPC drain


def make_backend(name: str, seaweed: SeaweedServer | None, tmp_path) -> backends.Backend:
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    if name == "local":
        return backends.local_backend(root=str(tmp_path / "store"))
    if name == "seaweedfs":
        return backends.seaweedfs_backend(filer_url=seaweed.filer_url, root=prefix)
    if name == "s3":
        return backends.s3_backend(endpoint_url=seaweed.s3_url, bucket="slp-test", root=prefix,
                           key=seaweed.access_key, secret=seaweed.secret_key)
    raise ValueError(name)


@pytest.fixture(params=BACKEND_NAMES)
def backend(request, tmp_path):
    seaweed = request.getfixturevalue("seaweed") if request.param != "local" else None
    return make_backend(request.param, seaweed, tmp_path)


@pytest.fixture
def store(backend):
    return ArtifactStore(backend)


@pytest.fixture
def cache(tmp_path):
    return LocalCache(str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def gemma_path():
    from slp_runner.examples import gemma_path as assemble

    return assemble()


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # spans several 1 MiB blocks, odd tail
    return path


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "hello"}\n\n{"id": "b", "prompt": "world", "max_tokens": 4}\n')
    return path
