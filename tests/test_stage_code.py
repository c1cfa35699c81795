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
