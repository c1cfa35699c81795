"""The stage cache key covers the code a stage runs: an edited stage runs again,
its downstream stages follow only if its outputs changed, unrelated edits change nothing."""

import functools
import importlib.metadata
import os
import subprocess
import sys

import blake3
import orjson
import pytest
import yaml

from test_cli import SLP

import slp_runner.stages.builtin as builtin
from slp_runner.pipeline.code_fingerprint import code_fingerprint
from slp_runner.pipeline.spec import build_pipeline
from slp_runner.pipeline.stage_cache import stage_key

PIPELINE = """\
name: edited
stages:
  a:
    _target_: make_text.make
    params: {word: hello}
  b:
    _target_: read_text.shout
    inputs: {text: "@a.text"}
  c:
    _target_: slp_runner.stages.builtin.sleep
    params: {seconds: 0}
"""

# Stage a writes a file into its stage folder; stage b reads it (by content, as a LocalFile).
MAKE = """\
import os

from slp_runner.pipeline.context import LocalFile


def make(ctx, word):
    path = os.path.join(ctx.stage_dir, "text.txt")
    with open(path, "w") as f:
        f.write(word)
    return {"text": LocalFile(path)}
"""

READ = """\
def shout(ctx, text):
    with open(text.path) as f:
        return {"shouted": f.read().upper()}
"""


@pytest.fixture
def project(tmp_path):
    """A user's folder: stage modules on PYTHONPATH, a pipeline on Hydra's search path."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "make_text.py").write_text(MAKE)
    (code / "read_text.py").write_text(READ)
    (code / "unrelated.py").write_text("VALUE = 1\n")
    (tmp_path / "conf" / "pipeline").mkdir(parents=True)
    (tmp_path / "conf" / "pipeline" / "edited.yaml").write_text(PIPELINE)
    return tmp_path


def run(project):
    """One `slp` run in a fresh process, as a user does it; returns its manifest."""
    env = dict(os.environ, PYTHONPATH=str(project / "code"), SLP_STORE_ROOT=str(project / "store"),
               SLP_CACHE_DIR=str(project / "cache"),
               # Edits in the same second must not be hidden by a stale .pyc
               PYTHONDONTWRITEBYTECODE="1")
    runs = project / "runs"
    before = set(os.listdir(runs)) if runs.is_dir() else set()
    proc = subprocess.run([SLP, f"hydra.searchpath=[file://{project / 'conf'}]", "pipeline=edited",
                           f"runner.runs_dir={runs}"], env=env, capture_output=True, text=True,
                          cwd=project, timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    (new,) = {d for d in os.listdir(runs) if d.startswith("run-")} - before
    return orjson.loads((runs / new / "manifest.json").read_bytes())


def hits(manifest):
    return {name: st["cache_hit"] for name, st in manifest["stages"].items()}


def edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_an_edited_stage_runs_again_and_its_new_output_flows_downstream(project):
    first = run(project)
    assert hits(first) == {"a": False, "b": False, "c": False}
    assert first["stages"]["b"]["outputs"] == {"shouted": "HELLO"}

    edit(project / "code" / "make_text.py", "f.write(word)", "f.write(word + ', world')")
    edited = run(project)
    assert hits(edited) == {"a": False, "b": False, "c": True}
    assert edited["stages"]["b"]["outputs"] == {"shouted": "HELLO, WORLD"}

    again = run(project)
    assert hits(again) == {"a": True, "b": True, "c": True}
    assert again["stages"]["b"]["outputs"] == {"shouted": "HELLO, WORLD"}


def test_an_edit_that_keeps_the_output_stops_at_the_edited_stage(project):
    run(project)
    edit(project / "code" / "make_text.py", "def make(", "# same output, new source\ndef make(")
    edited = run(project)
    # a runs again; its file is byte-identical, so b (keyed by content) stays a hit
    assert hits(edited) == {"a": False, "b": True, "c": True}
    assert edited["stages"]["b"]["outputs"] == {"shouted": "HELLO"}


def test_editing_an_unrelated_module_changes_nothing(project):
    first = run(project)
    (project / "code" / "unrelated.py").write_text("VALUE = 2  # edited\n")
    again = run(project)
    assert hits(again) == {"a": True, "b": True, "c": True}
    assert {n: s["key"] for n, s in again["stages"].items()} == {n: s["key"] for n, s in first["stages"].items()}


def test_the_manifest_names_the_code_of_every_stage(project):
    manifest = run(project)
    version = importlib.metadata.version("slp-runner")
    source = (project / "code" / "make_text.py").read_bytes()
    assert manifest["stages"]["a"]["code"] == {
        "module": "make_text", "blake3": blake3.blake3(source).hexdigest(), "slp_runner": version}
    # a built-in stage has one too: this repository's module (editable) or its distribution
    assert manifest["stages"]["c"]["code"] == code_fingerprint(builtin.sleep)
    assert manifest["stages"]["c"]["code"]["slp_runner"] == version
    # the stage cache record carries it as well
    key = manifest["stages"]["a"]["key"]
    record = orjson.loads((project / "store" / "stage-cache" / f"{key}.json").read_bytes())
    assert record["code"] == manifest["stages"]["a"]["code"]


def test_this_repository_installed_editable_is_hashed_by_its_source():
    with open(builtin.__file__, "rb") as f:
        digest = blake3.blake3(f.read()).hexdigest()
    assert code_fingerprint(builtin.sleep) == {
        "module": "slp_runner.stages.builtin", "blake3": digest, "slp_runner": importlib.metadata.version("slp-runner")}


def test_an_installed_package_is_named_by_distribution_and_version():
    code = code_fingerprint(yaml.safe_dump)
    assert code["distribution"].lower() == "pyyaml"
    assert code["version"] == importlib.metadata.version("PyYAML")
    assert set(code) == {"distribution", "version", "slp_runner"}
    # partials and decorated functions count as the function they wrap
    assert code_fingerprint(functools.partial(yaml.safe_dump, indent=4)) == code

    @functools.wraps(yaml.safe_dump)
    def logged(*args, **kwargs):
        return yaml.safe_dump(*args, **kwargs)

    assert code_fingerprint(logged) == code


def test_a_c_function_falls_back_to_its_distribution():
    code = code_fingerprint(orjson.dumps)
    assert code["distribution"] == "orjson" and code["version"] == importlib.metadata.version("orjson")
    assert code_fingerprint(len) == {"module": "builtins", "unknown": True,
                                     "slp_runner": code["slp_runner"]}


def test_the_key_changes_with_the_file_in_one_process(tmp_path, monkeypatch):
    """In-process: a changed file (size or mtime) is hashed again, not served from the memo."""
    module = tmp_path / "inproc_stage.py"
    module.write_text("def go(ctx):\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "inproc_stage", raising=False)
    stages = {"go": {"_target_": "inproc_stage.go"}}
    before = build_pipeline("p", stages).stages["go"]
    module.write_text("def go(ctx):\n    return {'edited': True}\n")
    after = build_pipeline("p", stages).stages["go"]
    assert before.code["blake3"] != after.code["blake3"]
    assert stage_key(before, {}) != stage_key(after, {})
    monkeypatch.delitem(sys.modules, "inproc_stage", raising=False)


# -- what else a stage's key must see (found by probing as a user) ------------------------

FACTORY = """\
def make_stage(n):
    def stage(ctx):
        return {"n": n}
    return stage
"""


def test_a_stage_made_by_a_factory_in_another_module(project):
    code = project / "code"
    (code / "factory.py").write_text(FACTORY)
    (code / "made.py").write_text("from factory import make_stage\n\ngo = make_stage(1)\n")
    (project / "conf" / "pipeline" / "edited.yaml").write_text("name: edited\nstages:\n  go:\n    _target_: made.go\n")
    assert run(project)["stages"]["go"]["outputs"] == {"n": 1}
    edit(code / "made.py", "make_stage(1)", "make_stage(2)")
    again = run(project)
    assert not again["stages"]["go"]["cache_hit"]
    assert again["stages"]["go"]["outputs"] == {"n": 2}
    assert again["stages"]["go"]["code"]["target_module"]["module"] == "made"


def test_an_output_file_named_like_a_hash_counts_by_content(project):
    """Only a verified cache entry is trusted by its name; any other file by its bytes."""
    code = project / "code"
    edit(code / "make_text.py", 'os.path.join(ctx.stage_dir, "text.txt")', 'os.path.join(ctx.stage_dir, "ab" * 32 + ".txt")')
    assert run(project)["stages"]["b"]["outputs"] == {"shouted": "HELLO"}
    edit(code / "make_text.py", "f.write(word)", "f.write(word + ', world')")
    again = run(project)
    assert hits(again) == {"a": False, "b": False, "c": True}
    assert again["stages"]["b"]["outputs"] == {"shouted": "HELLO, WORLD"}


PARAMS = """\
name: edited
stages:
  read:
    _target_: read_params.read
    params: {file: "%s", folder: "%s"}
"""

READ_PARAMS = """\
import os


def read(ctx, file, folder):
    with open(file) as f:
        text = f.read()
    return {"file": text, "folder": sorted((n, open(os.path.join(folder, n)).read()) for n in os.listdir(folder))}
"""


def test_parameter_files_and_folders_count_by_stat_ctime_included(project):
    data, param = project / "data", project / "param.txt"
    data.mkdir()
    (data / "x.txt").write_text("one")
    param.write_text("AAAA")
    (project / "code" / "read_params.py").write_text(READ_PARAMS)
    (project / "conf" / "pipeline" / "edited.yaml").write_text(PARAMS % (param, data))
    assert run(project)["stages"]["read"]["outputs"]["file"] == "AAAA"
    st = os.stat(param)
    param.write_text("BBBB")  # same size, old mtime put back
    os.utime(param, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = run(project)
    assert not second["stages"]["read"]["cache_hit"] and second["stages"]["read"]["outputs"]["file"] == "BBBB"
    (data / "x.txt").write_text("two")
    third = run(project)
    assert not third["stages"]["read"]["cache_hit"] and third["stages"]["read"]["outputs"]["folder"] == [["x.txt", "two"]]
    assert run(project)["stages"]["read"]["cache_hit"]


def test_a_damaged_or_foreign_stage_cache_record_is_a_miss(project):
    first = run(project)
    record = project / "store" / "stage-cache" / f"{first['stages']['a']['key']}.json"
    record.write_bytes(b"{damaged")
    second = run(project)
    assert hits(second)["a"] is False  # ran again, and wrote a sound record
    assert orjson.loads(record.read_bytes())["key"] == first["stages"]["a"]["key"]
    forged = orjson.loads(record.read_bytes())
    forged["target"] = "elsewhere.other"
    forged["outputs"] = {"text": {"local_file": "/etc/hostname"}}
    record.write_bytes(orjson.dumps(forged))
    third = run(project)
    assert hits(third)["a"] is False
    assert third["stages"]["b"]["outputs"] == {"shouted": "HELLO"}


def test_a_cached_fetch_whose_cache_entry_was_damaged_runs_again(tmp_path):
    """put_get_model's get stage is a stage-cache hit only while its cache entry validates."""
    env = dict(os.environ, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    from slp_runner.examples import gemma_path
    args = [SLP, "pipeline=put_get_model", f"model.path={gemma_path()}", f"runner.runs_dir={tmp_path / 'runs'}"]
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    (entry,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs if f.endswith(".gguf")]
    os.chmod(entry, 0o644)
    with open(entry, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\0\1\2\3")
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    manifests = [orjson.loads((tmp_path / "runs" / r / "manifest.json").read_bytes())
                 for r in os.listdir(tmp_path / "runs") if r.startswith("run-")]
    manifest = max(manifests, key=lambda m: m["start_time"])  # ids made in one second do not sort by time
    assert manifest["stages"]["put_model"]["cache_hit"] and not manifest["stages"]["get_model"]["cache_hit"]
    assert blake3.blake3(open(entry, "rb").read()).hexdigest() == manifest["artifacts"]["get_model.model"]["hash"]
