"""What a user waits for before ``slp`` does anything: whole-process times of the
commonest commands beside Python's own floor and ``import hydra``, and where the
time of a warm ``slp task=get`` goes (interpreter, imports, compose, work). ``slp``
runs through its resident server (started first, in a folder of the benchmark's) and,
as ``own process``, with ``SLP_SERVER=off`` (a first command); the breakdown is of
the latter.

    python -m benchmarks.startup [--reps 11] [--before /path/to/older/checkout]

Local store in a temporary folder; one 1 MiB blob put and fetched once, so every
``task=get`` below is a cache hit. Each figure is the median of ``--reps`` runs,
alternating the commands so drift hits all alike. ``--before`` runs the same
commands with another checkout's package first on PYTHONPATH (its Makefile's
compileall applied there too), for a before/after table from one run. Results:
``runs/bench-startup-<time>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks._report import out_dir, publish

SLP_MAIN = "import sys; from slp_runner.cli import main; sys.argv[0] = 'slp'; main()"

# The breakdown of one warm get, in a fresh process: imports (everything the command
# imports, loaded first), compose (read back the kept config), work (the task).
BREAKDOWN = r"""
import json, sys, time
t0 = time.perf_counter()
import importlib.util
for name in MODULES:
    if importlib.util.find_spec(name) is not None:  # cython_runtime and such: made, not imported
        __import__(name)
t1 = time.perf_counter()
from slp_runner import cli, compose, tasks
composed = compose.compose_single(ARGV)
t2 = time.perf_counter()
tasks.single_run_overrides = composed.overrides
cli.run_reporting_errors(composed.config)  # its lines, then ours last
t3 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "compose": t2 - t1, "work": t3 - t2, "cached": composed.cached}))
"""


def timed(cmd: list[str], env: dict, cwd: str) -> float:
    # In a folder of its own: ``python -c`` puts the working folder first on sys.path,
    # and this repository's slp_runner/ would shadow the --before checkout's.
    t0 = time.perf_counter()
    got = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         cwd=cwd)
    took = time.perf_counter() - t0
    if got.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {got.stderr.strip()}")
    return took


def modules_of(argv: list[str], env: dict, cwd: str) -> list[str]:
    """The modules a warm run of ``slp argv`` imports (beyond the interpreter's own)."""
    code = (f"import sys; base = set(sys.modules); sys.argv = ['slp', *{argv!r}]\n"
            "import io, contextlib\nfrom slp_runner.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main()\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m not in base and '.' not in m or "
            "m.startswith('slp_runner'))), file=sys.stderr)")
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=cwd)
    return [m for m in got.stderr.split() if m and not m.startswith("_") and m != "__main__"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--before", help="an older checkout of this repository, for a before/after table")
    args = ap.parse_args()
    py, slp = sys.executable, os.path.join(os.path.dirname(sys.executable), "slp")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, SLP_STORE_ROOT=os.path.join(tmp, "store"), SLP_CACHE_DIR=os.path.join(tmp, "cache"),
                   SLP_COMPOSE_CACHE=os.path.join(tmp, "compose"), SLP_SERVER_DIR=os.path.join(tmp, "srv"))
        env.pop("SLP_SERVER", None)
        alone = dict(env, SLP_SERVER="off")  # each command in its own process: a first command
        subprocess.run([slp, "--start-server"], env=env, check=True, stdout=subprocess.DEVNULL)
        blob = os.path.join(tmp, "blob.bin")
        with open(blob, "wb") as f:
            f.write(os.urandom(1 << 20))
        put = subprocess.run([slp, "task=put", "kind=blob", f"path={blob}", "format=json"], env=env,
                             capture_output=True, text=True, check=True)
        oid = json.loads(put.stdout)["hash"]
        get, ls = ["task=get", f"hash={oid}"], ["task=ls"]
        commands = {
            "python -c pass": ([py, "-c", "pass"], env),
            "python -c 'import hydra'": ([py, "-c", "import hydra"], env),
            "slp --version": ([slp, "--version"], env),
            "slp task=get (cache hit)": ([slp, *get], env),
            "slp task=ls": ([slp, *ls], env),
            "slp task=get (cache hit), own process": ([slp, *get], alone),
            "slp task=get (cache hit), own process, SLP_COMPOSE_CACHE=off": (
                [slp, *get], dict(alone, SLP_COMPOSE_CACHE="off")),
            "slp task=ls, own process": ([slp, *ls], alone),
        }
        if args.before:
            old = dict(env, PYTHONPATH=os.path.abspath(args.before))
            subprocess.run([py, "-m", "compileall", "-q", os.path.join(args.before, "slp_runner")], check=False)
            commands["before: slp task=get (cache hit)"] = ([py, "-c", SLP_MAIN, *get], old)
            commands["before: slp task=ls"] = ([py, "-c", SLP_MAIN, *ls], old)
        for cmd, e in commands.values():  # warm: the kept config, the page cache
            timed(cmd, e, tmp)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.reps):
            for name, (cmd, e) in commands.items():
                times[name].append(timed(cmd, e, tmp))
        medians = {name: statistics.median(t) for name, t in times.items()}

        mods = modules_of(get, env, tmp)
        script = f"MODULES = {mods!r}\nARGV = {get!r}\n" + BREAKDOWN
        parts = [json.loads(subprocess.run([py, "-c", script], env=env, capture_output=True, text=True, check=True,
                                           cwd=tmp).stdout.splitlines()[-1]) for _ in range(args.reps)]
        breakdown = {k: statistics.median(p[k] for p in parts) for k in ("imports", "compose", "work")}
        breakdown["interpreter"] = medians["python -c pass"]
        subprocess.run([slp, "--stop-server"], env=env, stdout=subprocess.DEVNULL)

    hydra = medians["python -c 'import hydra'"]
    lines = ["# Start-up, whole process", "", f"Median of {args.reps}; Python {sys.version.split()[0]}, "
             f"{os.cpu_count()} cores.", "", "| command | seconds | / import hydra |", "|---|---|---|"]
    lines += [f"| {name} | {s:.3f} | {s / hydra:.2f} |" for name, s in medians.items()]
    total = sum(breakdown.values())
    lines += ["", "## Where a warm `slp task=get` goes (fresh process, medians)", "",
              "| part | seconds | share |", "|---|---|---|"]
    lines += [f"| {k} | {breakdown[k]:.3f} | {breakdown[k] / total:.0%} |"
              for k in ("interpreter", "imports", "compose", "work")]
    top = ", ".join(m for m in mods if "." not in m)
    lines += ["", f"imports: {len(mods)} modules beyond the interpreter's ({top})"]
    folder = out_dir("startup")
    publish(folder, lines, {"medians_s": medians, "breakdown_s": breakdown, "modules": mods, "reps": args.reps})


if __name__ == "__main__":
    main()
