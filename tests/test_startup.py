"""Each command imports what its task needs and nothing more (what a user waits for
before anything happens). Checked on the second run of a command line, when its
config is read back; speed itself is measured by ``make bench``, not here."""

import json
import os
import subprocess
import sys

import pytest

from test_integrity import cli_backend

SLP = os.path.join(os.path.dirname(sys.executable), "slp")
HEAVY = {"hydra", "gguf", "numpy", "s3fs", "aiobotocore", "botocore", "boto3", "requests", "fsspec", "matplotlib",
         "slp_runner.pipeline", "tqdm"}


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"),
             SLP_COMPOSE_CACHE=str(tmp_path / "compose"))
    e["SLP_SERVER"] = "off"  # what a process imports itself: a first run, or SLP_SERVER=off
    return e


def imports_of(env, *args) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``slp args`` twice; the modules the second run imported (top-level names too)."""
    for _ in range(2):
        got = subprocess.run([sys.executable, "-X", "importtime", SLP, *args], env=env, capture_output=True,
                             text=True, timeout=120)
    mods = {ln.rsplit("|", 1)[1].strip() for ln in got.stderr.splitlines() if ln.startswith("import time:")}
    return got, mods | {m.split(".")[0] for m in mods} | {".".join(m.split(".")[:2]) for m in mods}


def put_blob(env, tmp_path, *args) -> str:
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(2048))
    got = subprocess.run([SLP, "task=put", "kind=blob", f"path={path}", "format=json", *args], env=env,
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    return json.loads(got.stdout)["hash"]


def test_local_ls_and_cache_hit_import_no_backend_library(env, tmp_path):
    oid = put_blob(env, tmp_path)
    got, mods = imports_of(env, "task=ls")
    assert got.returncode == 0 and "1 artifact" in got.stdout
    assert HEAVY - {"fsspec"} & mods == set()  # the local backend is fsspec's, nothing else
    got, mods = imports_of(env, "task=get", f"hash={oid}")
    assert got.returncode == 0 and "Local cache hit" in got.stdout
    assert HEAVY & mods == set()
    assert {"omegaconf", "blake3"} <= mods  # the config, the hash: what a hit does need


def test_filer_task_imports_requests_not_s3(env, tmp_path, seaweed):
    args = cli_backend("seaweedfs", seaweed, env)
    oid = put_blob(env, tmp_path, *args)
    got, mods = imports_of(env, "task=show", f"hash={oid}", *args)
    assert got.returncode == 0, got.stderr
    assert "requests" in mods and "fsspec" in mods
    assert {"hydra", "s3fs", "aiobotocore", "botocore", "gguf", "numpy", "matplotlib"} & mods == set()


def test_s3_task_imports_s3fs(env, tmp_path, seaweed):
    args = cli_backend("s3", seaweed, env)
    put_blob(env, tmp_path, *args)
    got, mods = imports_of(env, "task=ls", *args)
    assert got.returncode == 0, got.stderr
    assert "s3fs" in mods and {"hydra", "gguf", "numpy", "matplotlib"} & mods == set()


def test_gguf_parser_only_for_a_model(env, tmp_path, gemma_path):
    got, mods = imports_of(env, "task=put_model", f"model.path={gemma_path}")
    assert got.returncode == 0, got.stderr
    assert "gguf" in mods  # its header is read: name, architecture, quantization
    oid = put_blob(env, tmp_path)
    got, mods = imports_of(env, "task=show", f"hash={oid}")
    assert got.returncode == 0 and "gguf" not in mods and "numpy" not in mods
