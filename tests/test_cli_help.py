"""The command as a new user meets it: help, version, completion, typed keys, and one
line with a suggestion for a misspelt key or task."""

import json
import os
import subprocess
import sys

import pytest

import slp_runner
from slp_runner.cli_help import CONF_DIR, yaml_keys
from slp_runner.schema import SlpConfig
from slp_runner.tasks import TASKS

SLP = os.path.join(os.path.dirname(sys.executable), "slp")


def slp(*args, env=None, cwd=None):
    return subprocess.run([SLP, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def test_help_lists_every_task_and_pipeline(tmp_path):
    out = slp("--help", cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == ""
    lines = out.stdout.splitlines()
    for name, task in TASKS.items():
        assert any(line.split() and line.split()[0] == name and task.summary in line for line in lines), name
    for pipeline in os.listdir(os.path.join(CONF_DIR, "pipeline")):
        assert pipeline[:-5] in out.stdout
    assert "powered by Hydra" not in out.stdout


@pytest.mark.parametrize("task", ["put_model", "get", "runs", "compare", "ls"])
def test_task_help_lists_its_keys_with_defaults(task, tmp_path):
    out = slp(f"task={task}", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"slp task={task}: {TASKS[task].summary}")
    defaults = {k.key: k.default for k in yaml_keys(os.path.join(CONF_DIR, "config.yaml"))}
    for key in TASKS[task].keys:
        leaves = [k for k in defaults if (k == key or k.startswith(key + ".")) and defaults[k] != ""]
        for leaf in leaves:
            assert f"{leaf}={defaults[leaf]}" in out.stdout, leaf


def test_pipeline_help_lists_its_stages(tmp_path):
    out = slp("pipeline=run_infer", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for stage in ("fetch_model", "fetch_prompts", "load_model", "inference", "upload_results"):
        assert f"  {stage}: " in out.stdout


def test_help_for_an_unknown_task_is_one_line(tmp_path):
    out = slp("task=put_modle", "--help", cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("slp: error: unknown task 'put_modle' (did you mean put_model? choose from "
                          f"{', '.join(TASKS)})\n")


def test_version_is_slp_runners(tmp_path):
    out = slp("--version", cwd=tmp_path)
    assert out.returncode == 0
    assert out.stdout.startswith(f"slp-runner {slp_runner.__version__} (Python ")


@pytest.mark.parametrize("arg, suggestion", [
    ("runner.forc=true", "runner.force"),
    ("forc=true", "runner.force"),
    ("workers=3", "runner.workers"),
    ("hsh=abc", "hash"),
    ("backend.rot=x", "backend.root"),
])
def test_unknown_key_is_one_line_with_the_closest(arg, suggestion, tmp_path):
    out = slp("task=ls", arg, cwd=tmp_path)
    key = arg.split("=")[0]
    assert out.returncode == 2
    assert out.stderr.startswith(f"slp: error: unknown key '{key}' (did you mean {suggestion}")
    assert out.stderr.count("\n") == 1


def test_unknown_task_suggests(tmp_path):
    out = slp("task=lss", cwd=tmp_path, env=dict(os.environ, SLP_STORE_ROOT=str(tmp_path / "s")))
    assert out.returncode == 1
    assert out.stderr.startswith("slp: error: unknown task 'lss' (did you mean ls? choose from")


def test_booleans_and_numbers_are_typed(tmp_path):
    env = dict(os.environ, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    runs = f"runner.runs_dir={tmp_path / 'runs'}"
    first = slp("pipeline=store_prompts", runs, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # "no" is false: the stages come from the stage cache (before, the string "no" forced them)
    second = slp("pipeline=store_prompts", runs, "runner.force=no", env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    listing = json.loads(slp("task=runs", runs, "format=json", env=env, cwd=tmp_path).stdout)
    newest = listing["runs"][0]
    assert newest["overrides"][-1] == "runner.force=no" and newest["cache_hits"] == newest["stages"] == 4
    bad = slp("pipeline=store_prompts", runs, "runner.workers=many", env=env, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr == "slp: error: runner.workers must be a whole number, got 'many'\n"
    wrong = slp("task=ls", "full_verify=perhaps", env=env, cwd=tmp_path)
    assert wrong.returncode == 2
    assert wrong.stderr == "slp: error: full_verify must be true or false (yes/no, on/off), got 'perhaps'\n"


def test_schema_and_config_yaml_hold_the_same_keys():
    from dataclasses import fields, is_dataclass

    def flat(cls, prefix=""):
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            if is_dataclass(default):
                yield from flat(type(default), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    in_yaml = {k.key for k in yaml_keys(os.path.join(CONF_DIR, "config.yaml")) if k.default != ""}
    in_schema = set(flat(SlpConfig)) - {"backend", "pipeline", "engine"}
    assert in_yaml == in_schema


def completions(script, line):
    """What bash offers for ``line`` (the cursor at its end), with the script sourced."""
    probe = (f'source {script}\nCOMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}\n'
             'COMP_WORDS=($COMP_LINE); COMP_CWORD=$((${#COMP_WORDS[@]}-1))\n'
             '_slp_complete; printf "%s\\n" "${COMPREPLY[@]}"\n')
    out = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_bash_completion_offers_tasks_pipelines_keys_and_files(tmp_path):
    script = tmp_path / "slp.bash"
    gen = slp("--completion", "bash", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    script.write_text(gen.stdout)
    assert completions(script, "slp task=") == list(TASKS)  # bash has already typed "task="
    assert completions(script, "slp task=put_") == ["put_model", "put_prompts"]
    assert completions(script, "slp pipeline=run") == ["run_infer"]
    assert completions(script, "slp backend=s") == ["s3", "seaweedfs"]
    assert completions(script, "slp runner.fo") == ["runner.force="]
    (tmp_path / "model-a.gguf").write_bytes(b"x")
    assert completions(script, f"slp model.path={tmp_path}/model-") == [f"{tmp_path}/model-a.gguf"]
