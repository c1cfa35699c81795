"""No credential in any file a run writes or publishes, however it was given.

End to end through the real ``slp`` command, on a SeaweedFS of its own whose S3
gateway takes long random credentials (so finding one in a file means it leaked):
every file of the local run folder and of its copy in the backend is read back.
"""

import io
import os
import secrets
import subprocess
import uuid

import orjson
import pytest

from conftest import EXAMPLE_PROMPTS, TEST_CONF, TEST_MAX_VOLUMES
from slp_runner import redaction
from slp_runner.redaction import REDACTED, Redactor, mask_override
from slp_runner.seaweed_server import SeaweedServer, free_ports
from test_cli import SLP

TESTS_DIR = os.path.dirname(__file__)
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_DEFAULT_PROFILE")


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    """A SeaweedFS whose S3 gateway accepts only long random credentials."""
    server = SeaweedServer(str(tmp_path_factory.mktemp("weed-secrets")), free_ports(),
                           access_key="AKIA" + secrets.token_hex(10).upper(), secret_key=secrets.token_urlsafe(30),
                           max_volumes=TEST_MAX_VOLUMES)
    server.start()
    yield server
    server.stop(timeout=2)


@pytest.fixture
def env(tmp_path):
    e = {k: v for k, v in os.environ.items() if k not in AWS_VARS}
    e.update(SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"),
             PYTHONPATH=os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p),
             AWS_EC2_METADATA_DISABLED="true")  # no credential from a metadata service, no wait for one
    return e


def slp(env, *args):
    return subprocess.run([SLP, *args, f"hydra.searchpath=[file://{TEST_CONF}]"], env=env, capture_output=True,
                          text=True, timeout=120)


def s3_args(weed, bucket, *credentials):
    return ["backend=s3", f"backend.endpoint_url={weed.s3_url}", f"backend.bucket={bucket}", *credentials]


def local_files(root) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


def s3_files(weed, bucket, run_id=None, folder="runs") -> dict[str, bytes]:
    import s3fs

    fs = s3fs.S3FileSystem(key=weed.access_key, secret=weed.secret_key, skip_instance_cache=True,
                           client_kwargs={"endpoint_url": weed.s3_url, "region_name": "us-east-1"})
    prefix = f"{bucket}/{folder}/{run_id}/" if run_id else f"{bucket}/{folder}/"
    return {p[len(prefix):]: fs.cat_file(p) for p in fs.find(prefix)}


def filer_files(weed, root, run_id) -> dict[str, bytes]:
    import fsspec

    fs = fsspec.filesystem("seaweedfs", filer_url=weed.filer_url, skip_instance_cache=True)
    prefix = f"{root}/runs/{run_id}/"
    return {p.lstrip("/")[len(prefix):]: fs.cat_file(p) for p in fs.find(prefix)}


def assert_clean(files: dict[str, bytes], *secret_values: str) -> None:
    assert files
    for rel, data in files.items():
        for s in secret_values:
            assert s.encode() not in data, f"{rel} holds a secret"


def the_run(runs) -> str:
    (run_id,) = [d for d in os.listdir(runs) if d.startswith("run-")]
    return run_id


def check_run(runs, published: dict[str, bytes], *secret_values: str) -> dict[str, bytes]:
    """Every file of the run folder (and nothing left in staging) and its backend copy are clean."""
    local = local_files(runs)
    assert_clean(local, *secret_values)
    run_id = the_run(runs)
    assert not os.listdir(os.path.join(runs, ".staging"))
    mine = {rel.split(os.sep, 1)[1]: data for rel, data in local.items() if rel.startswith(run_id + os.sep)}
    assert set(published) == set(mine)  # the whole folder was published...
    assert_clean(published, *secret_values)  # ... and the copy is as clean
    return mine


def test_seaweedfs_backend_copy(env, tmp_path, weed):
    root = f"sec-{uuid.uuid4().hex[:10]}"
    token, key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env.update(AWS_SECRET_ACCESS_KEY=key)  # not this backend's, still this process's secret
    runs = tmp_path / "runs"
    proc = slp(env, "pipeline=leaky", f"+pipeline.stages.leak.params.api_token={token}",
               f"prompts.path={EXAMPLE_PROMPTS}", f"runner.runs_dir={runs}",
               "backend=seaweedfs", f"backend.filer_url={weed.filer_url}", f"backend.root={root}")
    assert proc.returncode == 0, proc.stderr
    files = check_run(runs, filer_files(weed, root, the_run(runs)), token, key)
    assert f"+pipeline.stages.leak.params.api_token={REDACTED}" in orjson.loads(files["overrides.yaml"])
    assert REDACTED.encode() in files["stages/leak/debug.txt"]


@pytest.mark.parametrize("style", ["plain", "plus"])
def test_secret_given_on_the_command_line(env, tmp_path, weed, style):
    bucket = f"sec-{uuid.uuid4().hex[:10]}"
    extra = secrets.token_urlsafe(24)  # a secret the backend ignores, still a secret
    given = ([f"backend.key={weed.access_key}", f"backend.secret={weed.secret_key}"] if style == "plain" else
             [f"++backend.key={weed.access_key}", f"++backend.secret={weed.secret_key}", f"+backend.password={extra}"])
    runs = tmp_path / "runs"
    proc = slp(env, "pipeline=store_prompts", f"prompts.path={EXAMPLE_PROMPTS}", f"runner.runs_dir={runs}",
               *s3_args(weed, bucket, *given))
    assert proc.returncode == 0, proc.stderr
    run_id = the_run(runs)
    files = check_run(runs, s3_files(weed, bucket, run_id), weed.secret_key, weed.access_key, extra)
    overrides = orjson.loads(files["overrides.yaml"])
    assert [o for o in overrides if "backend.secret" in o] == [f"{given[1].split('=')[0]}={REDACTED}"]
    assert orjson.loads(files["manifest.json"])["overrides"] == overrides
    # reproduce still runs from the masked config and overrides, with the credentials given now
    again = slp(env, "task=reproduce", f"run={run_id}", f"runner.runs_dir={runs}", *s3_args(weed, bucket, *given))
    assert again.returncode == 0, again.stderr + again.stdout
    new_id = next(d for d in os.listdir(runs) if d.startswith("run-") and d != run_id)
    new_overrides = orjson.loads((runs / new_id / "overrides.yaml").read_bytes())
    assert new_overrides == [*overrides, f"# reproduces {run_id}"]
    assert_clean(local_files(runs), weed.secret_key, weed.access_key, extra)


def test_credentials_from_the_environment_only(env, tmp_path, weed):
    bucket = f"sec-{uuid.uuid4().hex[:10]}"
    env.update(AWS_ACCESS_KEY_ID=weed.access_key, AWS_SECRET_ACCESS_KEY=weed.secret_key)
    runs = tmp_path / "runs"
    proc = slp(env, "pipeline=leaky", f"prompts.path={EXAMPLE_PROMPTS}", f"runner.runs_dir={runs}",
               *s3_args(weed, bucket))
    assert proc.returncode == 0, proc.stderr
    files = check_run(runs, s3_files(weed, bucket, the_run(runs)), weed.secret_key, weed.access_key)
    # the stage did print them (so the check above means something), masked
    assert f"debugging the connection: {REDACTED} {REDACTED}".encode() in files["logs/leak.log"]
    assert files["stages/leak/debug.txt"].startswith(f"credentials: {REDACTED}".encode())
    assert orjson.loads(files["metrics.json"])["leak"]["debug"].startswith(REDACTED)
    # the stage cache records, shared through the backend, hold the stage's outputs and metrics
    records = s3_files(weed, bucket, folder="stage-cache")
    assert len(records) == 2
    assert_clean(records, weed.secret_key, weed.access_key)
    assert any(f"{REDACTED}".encode() in data for data in records.values())


def test_credentials_from_an_aws_profile(env, tmp_path, weed):
    """Only in ~/.aws/credentials, under the profile AWS_PROFILE names."""
    bucket = f"sec-{uuid.uuid4().hex[:10]}"
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    decoy = ("AKIA" + secrets.token_hex(10).upper(), secrets.token_urlsafe(30))
    (home / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = {decoy[0]}\naws_secret_access_key = {decoy[1]}\n\n"
        f"[slp-test]\naws_access_key_id = {weed.access_key}\naws_secret_access_key = {weed.secret_key}\n")
    env.update(HOME=str(home), AWS_PROFILE="slp-test")
    runs = tmp_path / "runs"
    proc = slp(env, "pipeline=leaky", f"prompts.path={EXAMPLE_PROMPTS}", f"runner.runs_dir={runs}",
               *s3_args(weed, bucket))
    assert proc.returncode == 0, proc.stderr  # s3fs found the profile's credentials too
    files = check_run(runs, s3_files(weed, bucket, the_run(runs)), weed.secret_key, weed.access_key)
    assert f"debugging the connection: {REDACTED} {REDACTED}".encode() in files["logs/leak.log"]


def test_a_failing_stage_that_prints_the_secret(env, tmp_path, weed):
    bucket = f"sec-{uuid.uuid4().hex[:10]}"
    env.update(AWS_ACCESS_KEY_ID=weed.access_key, AWS_SECRET_ACCESS_KEY=weed.secret_key)
    runs = tmp_path / "runs"
    proc = slp(env, "pipeline=leaky", "pipeline.stages.leak.params.fail=true", f"prompts.path={EXAMPLE_PROMPTS}",
               f"runner.runs_dir={runs}", *s3_args(weed, bucket))
    assert proc.returncode == 1
    assert "could not connect with" in proc.stderr
    assert weed.secret_key not in proc.stderr + proc.stdout and weed.access_key not in proc.stderr + proc.stdout
    files = check_run(runs, s3_files(weed, bucket, the_run(runs)), weed.secret_key, weed.access_key)
    manifest = orjson.loads(files["manifest.json"])
    assert manifest["status"] == "failed"
    assert manifest["stages"]["leak"]["error"].startswith(f"RuntimeError: could not connect with {REDACTED}")
    assert b"Traceback" in files["logs/leak.log"]


def test_multirun_sweep_folder(env, tmp_path, weed):
    """Two jobs, one failing with the secret in its error: nothing under the sweep
    folder (Hydra's multirun.yaml, results, summary) nor the runs holds it."""
    bucket = f"sec-{uuid.uuid4().hex[:10]}"
    sweep, runs = tmp_path / "sweep", tmp_path / "runs"
    proc = slp(env, "-m", "pipeline=leaky", "pipeline.stages.leak.params.fail=false,true",
               f"prompts.path={EXAMPLE_PROMPTS}", f"runner.runs_dir={runs}", f"hydra.sweep.dir={sweep}",
               *s3_args(weed, bucket, f"backend.key={weed.access_key}", f"backend.secret={weed.secret_key}"))
    assert proc.returncode == 1, proc.stderr  # one job failed, on purpose
    swept = local_files(sweep)
    assert {"multirun.yaml", "0/result.json", "1/result.json", "summary.csv"} <= set(swept)
    assert_clean(swept, weed.secret_key, weed.access_key)
    assert_clean(local_files(runs), weed.secret_key, weed.access_key)
    assert f"backend.secret={REDACTED}".encode() in swept["multirun.yaml"]
    failed = orjson.loads(swept["1/result.json"])
    assert failed["status"] == "failed" and f"could not connect with {REDACTED}" in failed["error"]
    assert f"backend.secret={REDACTED}" in failed["overrides"]


# The redactor itself

def test_overrides_are_masked_by_name_whatever_their_length():
    r = Redactor(environ={})
    assert r.overrides(["backend.secret=s", "+backend.secret=abc", "++x.token=t0k", "backend.key=K",
                        "+key=v", "hydra.job.env_set.AWS_SECRET_ACCESS_KEY=zz", "backend=s3", "runner.workers=2",
                        "~backend.secret", "backend.secret="]) == [
        "backend.secret=***", "+backend.secret=***", "++x.token=***", "backend.key=***", "+key=***",
        "hydra.job.env_set.AWS_SECRET_ACCESS_KEY=***", "backend=s3", "runner.workers=2", "~backend.secret",
        "backend.secret="]
    assert mask_override("backend.secret=a=b") == "backend.secret=***"


def test_values_are_masked_everywhere_but_short_ones_only_by_name():
    r = Redactor(config={"backend": {"secret": "long-enough-secret", "key": "short"}, "name": "long-enough-secret"},
                 environ={"GITHUB_TOKEN": "ghp_0123456789", "AWS_SHARED_CREDENTIALS_FILE": "/tmp/creds",
                          "TOKENIZERS_PARALLELISM": "false", "HOME": "/home/someone"})
    assert r.text("url http://u:long-enough-secret@h ghp_0123456789 short /tmp/creds") == \
        "url http://u:***@h *** short /tmp/creds"
    assert r.bytes(b"xlong-enough-secretx") == b"x***x"
    assert r.tree({"backend": {"key": "short", "n": "long-enough-secret"}, "stage": {"key": "abc"}}, names=False) == \
        {"backend": {"key": "short", "n": "***"}, "stage": {"key": "abc"}}
    assert r.tree({"backend": {"key": "short"}}) == {"backend": {"key": "***"}}
    assert r.tree({"infer": {"max_tokens": 64}}) == {"infer": {"max_tokens": 64}}  # a count, not a token


def test_folder_scrub_streams_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(redaction, "CHUNK", 64)  # many reads, secrets split between them
    secret = "s3cr3t-" + secrets.token_hex(8)
    longer = secret + "-and-more"  # masked whole, not as ***-and-more
    r = Redactor(extra=[secret, longer], environ={})
    body = b"".join(os.urandom(i % 61).replace(b"*", b"") + (secret if i % 2 else longer).encode()
                    for i in range(300))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "big.bin").write_bytes(body)
    (tmp_path / "clean.txt").write_text("nothing here")
    os.chmod(tmp_path / "sub" / "big.bin", 0o640)
    assert r.scrub_folder(str(tmp_path)) == 1
    data = (tmp_path / "sub" / "big.bin").read_bytes()
    assert data == r.bytes(body) and secret.encode() not in data and data.count(b"***") == 300
    assert os.stat(tmp_path / "sub" / "big.bin").st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path / "sub")) == ["big.bin"]  # no temporary left behind


def test_reproduce_a_run_with_masked_overrides(make_cfg):
    """In process, on the local backend: the saved config and overrides are masked,
    reproduce fills them from the current config and gets the same hashes."""
    from slp_runner.cache import LocalCache
    from slp_runner.cli import build_store
    from slp_runner.pipeline import from_config

    token = secrets.token_urlsafe(24)
    cfg = make_cfg("pipeline=store_prompts", f"+backend.api_token={token}")
    store = build_store(cfg)
    first = from_config.run_pipeline(cfg, store, LocalCache(cfg.cache_dir), [f"+backend.api_token={token}"],
                                     out=io.StringIO())
    assert_clean(local_files(first.folder), token)
    assert first.manifest["overrides"] == [f"+backend.api_token={REDACTED}"]
    result, comparison = from_config.reproduce(cfg, store, LocalCache(cfg.cache_dir), first.run_id,
                                               out=io.StringIO())
    assert comparison and all(comparison.values())
    assert result.manifest["overrides"] == [f"+backend.api_token={REDACTED}", f"# reproduces {first.run_id}"]
    assert_clean(local_files(result.folder), token)


def test_a_password_in_a_backend_url(env, tmp_path, weed):
    """http://user:password@filer: the filer ignores it, the run must not keep it."""
    root = f"sec-{uuid.uuid4().hex[:10]}"
    password = secrets.token_urlsafe(18)
    url = weed.filer_url.replace("http://", f"http://alice:{password}@")
    runs = tmp_path / "runs"
    proc = slp(env, "pipeline=store_prompts", f"runner.runs_dir={runs}", "backend=seaweedfs",
               f"backend.filer_url={url}", f"backend.root={root}")
    assert proc.returncode == 0, proc.stderr
    assert password not in proc.stdout + proc.stderr and "alice:***@" in proc.stdout
    files = check_run(runs, filer_files(weed, root, the_run(runs)), password)
    assert orjson.loads(files["manifest.json"])["backend"]["location"].startswith("http://alice:***@")


def test_masking_by_value_keeps_the_config_yaml(env, tmp_path):
    """A secret's value may stand inside other values (a path, say): config.yaml stays YAML."""
    import yaml

    env["MY_API_TOKEN"] = str(tmp_path)  # every path below tmp_path holds the "secret"
    runs = tmp_path / "runs"
    proc = slp(env, "pipeline=store_prompts", f"runner.runs_dir={runs}")
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load((runs / the_run(runs) / "config.yaml").read_text())
    assert config["cache_dir"] == f"{REDACTED}/cache"


def test_a_url_password_never_reaches_an_error_line(env):
    password = "pw-" + secrets.token_hex(6)
    unreachable = slp(env, "task=ls", "backend=seaweedfs", f"backend.filer_url=http://u:{password}@127.0.0.1:9",
                      "backend.retries=0")
    assert unreachable.returncode == 1 and "u:***@127.0.0.1:9" in unreachable.stderr
    bad = slp(env, "task=ls", f"backend.filer_url=http://u:{password}@127.0.0.1:9")  # not a key of the local backend
    assert bad.returncode == 2
    for proc in (unreachable, bad):
        assert password not in proc.stderr + proc.stdout


@pytest.mark.parametrize("server", ["on", "off"])
@pytest.mark.parametrize("flags", [["--cfg", "job"], ["--cfg", "job", "--resolve"], ["--cfg", "hydra"], ["--info"]],
                         ids=["cfg-job", "cfg-job-resolve", "cfg-hydra", "info"])
def test_printing_the_config_masks_credentials(env, tmp_path, flags, server):
    # Hydra's flags print the composed config itself: a secret given on the command line
    # (long or short), in the environment, or as a password in a URL shows as ***.
    long_secret, short_secret, env_secret = f"Cmd{secrets.token_hex(8)}", "s3cr", f"Env{secrets.token_hex(8)}"
    run_env = {**env, "SLP_SERVER": server, "AWS_SECRET_ACCESS_KEY": env_secret,
               "SLP_SERVER_DIR": str(tmp_path / "srv")}
    for secret_arg in (f"backend.secret={long_secret}", f"backend.secret={short_secret}"):
        got = subprocess.run([SLP, "task=ls", "backend=s3", secret_arg, "backend.key=AKIAEXAMPLEKEY1",
                              "backend.endpoint_url=http://user:UrlPass123@127.0.0.1:8333", *flags],
                             env=run_env, capture_output=True, text=True, timeout=120)
        out = got.stdout + got.stderr
        assert got.returncode == 0, out
        for secret in (long_secret, env_secret, "UrlPass123", "AKIAEXAMPLEKEY1", f"secret={short_secret}",
                       f"secret: {short_secret}"):
            assert secret not in out, (secret, out)
        assert "***" in out
        if flags[:2] == ["--cfg", "job"]:
            assert "secret: '***'" in out and "key: '***'" in out, out
