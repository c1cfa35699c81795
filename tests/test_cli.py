"""The `slp` command end to end, as a user runs it: real processes, real backends."""

import os
import subprocess
import sys

import pytest

SLP = os.path.join(os.path.dirname(sys.executable), "slp")


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    return e


def slp(env, *args, cwd=None):
    return subprocess.run([SLP, *args], env=env, capture_output=True, text=True, cwd=cwd, timeout=120)


def files_under(path):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


def hash_of(stdout):
    return stdout.strip().splitlines()[-1].split("hash=")[1].split()[0]


def test_put_get_dedup_on_local(env, tmp_path, gemma_path):
    put = slp(env, "task=put_model", f"model.path={gemma_path}", "model.name=gemma3", "+provenance.license=gemma")
    assert put.returncode == 0, put.stderr
    assert "Upload complete" in put.stdout and "Verification: OK" in put.stdout
    oid = hash_of(put.stdout)
    again = slp(env, "task=put_model", f"model.path={gemma_path}")
    assert "Skipped upload (deduplication)" in again.stdout
    assert hash_of(again.stdout) == oid
    out = tmp_path / "copy.gguf"
    get = slp(env, "task=get_model", f"hash={oid}", f"out={out}")
    assert get.returncode == 0, get.stderr
    assert out.read_bytes() == open(gemma_path, "rb").read()
    show = slp(env, "task=show", f"hash={oid}")
    assert '"license": "gemma"' in show.stdout and '"architecture": "gemma3"' in show.stdout


def test_put_get_on_seaweedfs(env, tmp_path, seaweed, prompts_file):
    backend = ["backend=seaweedfs", f"backend.filer_url={seaweed.filer_url}", "backend.root=cli-test"]
    put = slp(env, "task=put_prompts", f"prompts.path={prompts_file}", *backend)
    assert put.returncode == 0, put.stderr
    oid = hash_of(put.stdout)
    get = slp(env, "task=get", f"hash={oid}", f"out={tmp_path / 'p.jsonl'}", *backend)
    assert get.returncode == 0, get.stderr
    assert (tmp_path / "p.jsonl").read_bytes() == prompts_file.read_bytes()
    assert slp(env, "task=verify", f"hash={oid}", *backend).stdout.startswith("OK prompts")


def test_s3_credentials_never_printed(env, seaweed, small_file):
    env.update(AWS_ACCESS_KEY_ID=seaweed.access_key, AWS_SECRET_ACCESS_KEY=seaweed.secret_key)
    backend = ["backend=s3", f"backend.endpoint_url={seaweed.s3_url}", "backend.bucket=cli-test"]
    ok = slp(env, "task=put", "kind=blob", f"path={small_file}", *backend)
    assert ok.returncode == 0, ok.stderr
    oid = hash_of(ok.stdout)
    env["AWS_SECRET_ACCESS_KEY"] = "wrong-secret-do-not-print"
    bad = slp(env, "task=put", "kind=blob", f"path={small_file}", *backend)
    assert bad.returncode != 0
    # A get by hash alone probes every kind: the refusal names the hash and the credentials.
    bad_get = slp(env, "task=get", f"hash={oid}", *backend)
    assert bad_get.returncode != 0
    for failed in (bad, bad_get):
        line = failed.stderr.strip()
        assert "\n" not in line and line.startswith("slp: error: s3 backend at ") and "refused access" in line, line
        assert "check the credentials it is given" in line, line
    assert f"looking up hash {oid}" in bad_get.stderr, bad_get.stderr
    for text in (ok.stdout, ok.stderr, bad.stdout, bad.stderr, bad_get.stdout, bad_get.stderr):
        assert seaweed.secret_key not in text and "wrong-secret-do-not-print" not in text


def test_s3_without_credentials_says_so_and_how_to_give_them(env, seaweed, small_file, tmp_path):
    # Before: "s3 backend at ...: storing ... failed: Unable to locate credentials", which
    # said what was missing but not where slp looks for it.
    for name in [n for n in env if n.startswith("AWS_")]:
        del env[name]
    env["HOME"] = str(tmp_path / "home")  # no ~/.aws either
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # nor an instance role, on a cloud machine
    backend = ["backend=s3", f"backend.endpoint_url={seaweed.s3_url}", "backend.bucket=cli-test"]
    for task in (["task=put", "kind=blob", f"path={small_file}"], ["task=ls"]):
        got = slp(env, *task, *backend)
        line = got.stderr.strip()
        assert got.returncode != 0
        assert "\n" not in line and line.startswith(f"slp: error: s3 backend at {seaweed.s3_url}/cli-test has no "
                                                     "credentials ("), line
        assert line.endswith("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an AWS profile (~/.aws/credentials)")


BAD_INPUTS = [
    (["task=get_model", "hash=../../etc/passwd"], r"invalid reference '../../etc/passwd'"),
    (["task=get_model", "hash=" + "A" * 64], "no model with hash " + "a" * 64),  # hex in capitals: the same hash
    (["task=get_model", "hash=abc"], "no artifact named abc (a hash prefix needs at least 8 hex digits)"),
    (["task=put_model", "model.path=/nonexistent/model.gguf"], "/nonexistent/model.gguf: no such file"),
    (["task=put", "kind=blob", "path=/nonexistent/blob.bin"], "/nonexistent/blob.bin: no such file"),
    (["task=put_model", "model.path={notgguf}"], "fake.gguf: not a GGUF file"),
    (["task=put_prompts", "prompts.path={broken}"], r"broken.jsonl:3: invalid JSON"),
    (["task=get_model", "hash=" + "0" * 64], "no model with hash 0000"),
    (["task=put_model", "model.path={notgguf}", "backend=seaweedfs", "backend.filer_url=http://127.0.0.1:9"],
     "fake.gguf: not a GGUF file"),
    (["task=get_model", "hash=" + "1" * 64, "backend=seaweedfs", "backend.filer_url=http://127.0.0.1:9"],
     "unreachable at http://127.0.0.1:9"),
    (["task=ls", "backend=s3", "backend.endpoint_url=http://127.0.0.1:9", "backend.retries=0"],
     "unreachable at http://127.0.0.1:9"),
    (["task=ls", "backend=nope"], "unknown backend 'nope' (choose from local, s3, seaweedfs)"),
    (["task=fly"], "unknown task 'fly'"),
    (["task=put_model"], "missing model.path"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a)[:40] for a, _ in BAD_INPUTS])
def test_bad_input_one_line_nonzero_nothing_written(env, tmp_path, args, message):
    notgguf = tmp_path / "fake.gguf"
    notgguf.write_bytes(b"\x00" * 4096)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",\n')
    args = [a.format(notgguf=notgguf, broken=broken) for a in args]
    env.update(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    before = files_under(tmp_path)
    proc = slp(env, *args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("slp: error: ")
    assert message in lines[0]
    assert files_under(tmp_path) == before  # nothing in store, cache or next to the inputs
    if "no such file" in message:  # refused before a line says it is being uploaded
        assert proc.stdout == "", proc.stdout
