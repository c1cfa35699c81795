"""A backend key given a wrong value is one line naming the key and the value, checked when
the backend is built: not an "unreachable" backend or a library's message cut short.
Real `slp` processes, with the compose cache on (a miss, then a hit) and off."""

import os
import subprocess
import sys
import uuid

import pytest

from slp_runner.backends import s3_backend, seaweedfs_backend
from slp_runner.errors import ConfigError, one_line

SLP = os.path.join(os.path.dirname(sys.executable), "slp")
PASSWORD = "s3cret-pw"

FILER = ["backend=seaweedfs", "backend.filer_url={filer}", "backend.root={root}"]
S3 = ["backend=s3", "backend.endpoint_url={s3}", "backend.bucket=cfg-errors"]

# (overrides, what the line must hold after "slp: error: "). Seaweedfs and S3 are the
# real test servers: a bad value must be named even where the backend answers.
BAD = [
    ([*FILER, "backend.timeout=abc"], "backend.timeout: 'abc' is not a number of seconds"),
    ([*FILER, "backend.timeout=0"], "backend.timeout: 0 is not a number of seconds (more than 0)"),
    ([*FILER, "backend.timeout=-2.5"], "backend.timeout: -2.5 is not a number of seconds"),
    ([*FILER, "backend.timeout=true"], "backend.timeout: true is not a number of seconds"),
    ([*FILER, "backend.retries=-1"], "backend.retries: -1 is not a whole number (0 or more)"),
    ([*FILER, "backend.retries=1.5"], "backend.retries: 1.5 is not a whole number"),
    ([*FILER, "backend.retries=many"], "backend.retries: 'many' is not a whole number"),
    ([*FILER, "backend.backoff=-0.1"], "backend.backoff: -0.1 is not a number of seconds (0 or more)"),
    ([*FILER, "backend.backoff=soon"], "backend.backoff: 'soon' is not a number of seconds"),
    (["backend=seaweedfs", "backend.filer_url=notaurl"], "backend.filer_url: 'notaurl' is not an http(s) URL"),
    (["backend=seaweedfs", "backend.filer_url=ftp://127.0.0.1:8888"],
     "backend.filer_url: 'ftp://127.0.0.1:8888' is not an http(s) URL"),
    (["backend=seaweedfs", "backend.filer_url=http://127.0.0.1:port"],
     "backend.filer_url: 'http://127.0.0.1:port' is not an http(s) URL"),
    (["backend=seaweedfs", f"backend.filer_url=user:{PASSWORD}@notaurl"],
     "backend.filer_url: 'user:***@notaurl' is not an http(s) URL"),
    (["backend=seaweedfs", f"backend.filer_url=http://user:{PASSWORD}@"],
     "backend.filer_url: 'http://user:***@' is not an http(s) URL"),
    (["backend=s3", "backend.endpoint_url=notaurl"], "backend.endpoint_url: 'notaurl' is not an http(s) URL"),
    (["backend=s3", f"backend.endpoint_url=ftp://user:{PASSWORD}@host"],
     "backend.endpoint_url: 'ftp://user:***@host' is not an http(s) URL"),
    (["backend=s3", f"backend.endpoint_url=http://user:{PASSWORD}@"],
     "backend.endpoint_url: 'http://user:***@' is not an http(s) URL"),
    ([*S3, "backend.bucket=Bad_Bucket!"], "backend.bucket: 'Bad_Bucket!' is not an S3 bucket name (3-63 characters: "
                                          "lowercase letters, digits, dots and hyphens, starting and ending with a "
                                          "letter or digit)"),
    ([*S3, "backend.bucket=ab"], "backend.bucket: 'ab' is not an S3 bucket name"),
    ([*S3, "backend.bucket=-bucket"], "backend.bucket: '-bucket' is not an S3 bucket name"),
    ([*S3, "backend.bucket=" + "b" * 64], f"backend.bucket: '{'b' * 64}' is not an S3 bucket name"),
    ([*S3, "backend.region=bad_region"], "backend.region: 'bad_region' is not an AWS region name"),
    ([*S3, "backend.connect_timeout=abc"], "backend.connect_timeout: 'abc' is not a number of seconds"),
    ([*S3, "backend.retries=-1"], "backend.retries: -1 is not a whole number (0 or more)"),
    ([*S3, "backend.backoff=x"], "backend.backoff: 'x' is not a number of seconds (0 or more)"),
    ([*S3, "backend.part_size_mb=0"], "backend.part_size_mb: 0 is not a whole number of MiB (1 or more)"),
    ([*S3, "backend.max_concurrency=0"], "backend.max_concurrency: 0 is not a whole number (1 or more)"),
    ([*S3, "backend.read_concurrency=x"], "backend.read_concurrency: 'x' is not a whole number (1 or more)"),
    ([*S3, "backend.create_bucket=maybe"], "backend.create_bucket: 'maybe' is not true or false"),
]


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"),
             SLP_COMPOSE_CACHE=str(tmp_path / "compose"), AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    return e


def slp(env, cwd, *args):
    return subprocess.run([SLP, *args], env=env, capture_output=True, text=True, cwd=cwd, timeout=120)


def files_under(path, but):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) if not d.startswith(but) for f in fs)


@pytest.mark.parametrize("cache", ["on", "off"])
@pytest.mark.parametrize("args, message", BAD, ids=[f"{a[0]} {a[-1]}"[:60] for a, _ in BAD])
def test_bad_backend_value_is_one_line_naming_key_and_value(env, tmp_path, seaweed, cache, args, message):
    args = [a.format(filer=seaweed.filer_url, s3=seaweed.s3_url, root=f"cfg-{uuid.uuid4().hex[:8]}") for a in args]
    if cache == "off":
        env["SLP_COMPOSE_CACHE"] = "off"
    before = files_under(tmp_path, str(tmp_path / "compose"))
    for attempt in ("miss", "hit") if cache == "on" else ("off",):
        proc = slp(env, tmp_path, "task=ls", *args)
        assert proc.returncode != 0, (attempt, proc.stdout)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1, (attempt, proc.stderr)
        assert lines[0].startswith(f"slp: error: {message}"), (attempt, lines[0])
        assert PASSWORD not in proc.stderr + proc.stdout
    assert files_under(tmp_path, str(tmp_path / "compose")) == before  # no store, cache or runs folder


@pytest.mark.parametrize("cache", ["on", "off"])
def test_valid_values_still_work_on_the_real_filer(env, tmp_path, seaweed, small_file, cache):
    if cache == "off":
        env["SLP_COMPOSE_CACHE"] = "off"
    backend = ["backend=seaweedfs", f"backend.filer_url={seaweed.filer_url}",
               f"backend.root=cfg-{uuid.uuid4().hex[:8]}", "backend.timeout=5", "backend.retries=0", "backend.backoff=0"]
    put = slp(env, tmp_path, "task=put", "kind=blob", f"path={small_file}", *backend)
    assert put.returncode == 0, put.stderr
    ls = slp(env, tmp_path, "task=ls", *backend)
    assert ls.returncode == 0, ls.stderr
    assert "blob" in ls.stdout


@pytest.mark.parametrize("cache", ["on", "off"])
def test_valid_values_still_work_on_real_s3(env, tmp_path, seaweed, small_file, cache):
    if cache == "off":
        env["SLP_COMPOSE_CACHE"] = "off"
    env.update(AWS_ACCESS_KEY_ID=seaweed.access_key, AWS_SECRET_ACCESS_KEY=seaweed.secret_key)
    backend = ["backend=s3", f"backend.endpoint_url={seaweed.s3_url}", "backend.bucket=cfg.ok-1",
               f"backend.root=r{uuid.uuid4().hex[:8]}", "backend.connect_timeout=2.5", "backend.retries=1",
               "backend.backoff=0", "backend.part_size_mb=5", "backend.max_concurrency=1",
               "backend.read_concurrency=2", "backend.create_bucket=yes", "backend.region=us-west-2"]
    put = slp(env, tmp_path, "task=put", "kind=blob", f"path={small_file}", *backend)
    assert put.returncode == 0, put.stderr
    ls = slp(env, tmp_path, "task=ls", *backend)
    assert ls.returncode == 0, ls.stderr
    assert "blob" in ls.stdout


def test_factories_take_numbers_given_as_text(seaweed):
    """Values from an environment variable (``${oc.env:...}``) arrive as strings."""
    filer = seaweedfs_backend(filer_url=seaweed.filer_url, root="x", timeout="5", retries="2", backoff="0.5")
    assert (filer.resumes, filer.resume_backoff) == (2, 0.5)
    s3 = s3_backend(endpoint_url=seaweed.s3_url, bucket="cfg-text", retries="3", part_size_mb="5",
                    create_bucket="false", connect_timeout="1")
    assert s3.resumes == 3 and s3.write_options["chunksize"] == 5 * 1024 * 1024
    with pytest.raises(ConfigError, match=r"^backend\.retries: '2\.0' is not a whole number"):
        seaweedfs_backend(filer_url=seaweed.filer_url, retries="2.0")


def test_multiline_botocore_error_keeps_its_reason():
    """botocore's ParamValidationError puts "Parameter validation failed:" first and the
    reasons below: one line must keep them (the real message, from the real client)."""
    import botocore.session
    from botocore.exceptions import ParamValidationError

    client = botocore.session.get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="k", aws_secret_access_key="s")
    with pytest.raises(ParamValidationError) as caught:
        client.list_objects_v2(Bucket="Bad_Bucket!")
    assert len(str(caught.value).splitlines()) > 1  # what a first line alone would cut
    line = one_line(caught.value)
    assert "\n" not in line
    assert line.startswith('Parameter validation failed: Invalid bucket name "Bad_Bucket!"')
    two = ParamValidationError(report="Missing required parameter in input: \"Key\"\nUnknown parameter: \"X\"")
    assert one_line(two) == ('Parameter validation failed: Missing required parameter in input: "Key"; '
                             'Unknown parameter: "X"')
    assert one_line(ValueError("first\nsecond")) == "first"
    assert one_line(ValueError("")) == "ValueError"


@pytest.mark.parametrize("cache", ["on", "off"])
@pytest.mark.parametrize("args, typed, gone", [
    (["task=get", "~model", "model.path=x"], "model.path=x", "model"),
    (["task=get", "~prompts", "prompts.tag=v1"], "prompts.tag='v1'", "prompts"),
])
def test_setting_a_key_inside_a_deleted_node_says_so(env, tmp_path, cache, args, typed, gone):
    if cache == "off":
        env["SLP_COMPOSE_CACHE"] = "off"
    proc = slp(env, tmp_path, *args)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    key = typed.partition("=")[0]
    assert line.startswith(f"slp: error: {key}="), line
    assert f"sets a key inside '{gone}', which ~{gone} deleted (drop ~{gone}, or write +{key}=" in line
    assert "did you mean" not in line


def test_a_misspelt_key_beside_a_deletion_still_gets_suggestions(env, tmp_path):
    proc = slp(env, tmp_path, "task=get", "~model", "prompts.pat=x")
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert "did you mean" in line and "prompts.path" in line
