"""Whole-process benchmarks: ``slp`` as a user runs it, each iteration a new process
timed by the wall clock from spawn to exit, beside a reference process in the same
job (iterations alternate, as in :mod:`.storage`).

- ``cli_get``: ``slp task=get hash=<h>`` into an empty cache (a new ``SLP_CACHE_DIR``
  each time) vs ``curl -o`` on the filer, boto3's ``download_file`` in a ``python -c``
  process on S3, ``cp`` on local disk.
- ``cli_put``: ``slp task=put kind=blob path=<file>`` with fresh bytes each time (the
  stored object is removed after) vs ``curl -T``, boto3's ``upload_file``, ``cp``.
- ``cli_hit``: ``slp task=get hash=<h>`` answered by a warm cache (the path on stdout)
  vs ``python -c "import hydra"``, the start-up any Hydra app pays; ``python -c pass``
  is timed too, as the floor (``floor`` in the metrics).
- ``cli_ls``: ``slp task=ls`` vs the same two.

The slp processes find the backend the way a user's shell points them at it: the
variables ``conf/backend/*.yaml`` read (``SLP_STORE_ROOT``, ``SLP_FILER_URL``,
``SLP_FILER_ROOT``, ``SLP_S3_ENDPOINT``, ``SLP_S3_BUCKET``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``), taken from the job's own store, plus the overrides the
user typed that concern the backend (:func:`passed_overrides`). ``slp`` hands each
command to its resident server (:mod:`slp_runner.server`), started before timing in a
folder of the job's, as a user's earlier commands would have; each op also times
``slp`` in its own process (``SLP_SERVER=off``: a first command), reported as
``own_process``. Each process's peak RSS is its own ``ru_maxrss``, read with
``wait4``, or its server worker's where that is larger. The config slp remembers per command
line is kept in the job's own folder (unless ``SLP_COMPOSE_CACHE`` is set): the
``bench.warmup`` processes fill it, as a user's earlier commands would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterable

from ..artifacts import BLOB
from ..backends import Backend
from ..errors import ConfigError
from ..hashing import hash_file
from ..redaction import strip_url_password
from ..stats import percentile
from ..store import ArtifactStore
from .references import reference_for
from .storage import ProcessUsage, Series, in_turn, refresh_head

# Overrides a job passes on to its slp processes: those that change what a get, put or
# ls does. Anything else the job was given (bench.*, runner.*, hydra.sweep.*) is its own.
PASSED_KEYS = ("verify_upload", "verify_existing", "hash_ahead", "sha256", "full_verify", "hydra.searchpath")
HYDRA_IMPORT = 'python -c "import hydra"'
FLOOR = "python -c pass"
STDERR_TAIL = 600  # characters of a failed process's stderr kept in its error
PUT_HASH_RE = re.compile(r"\bhash=([0-9a-f]{64})\b")


class ProcessFailed(subprocess.CalledProcessError):
    """A timed process exited non-zero; its message ends with the tail of its stderr."""

    def __str__(self) -> str:
        tail = (self.stderr or "").strip()[-STDERR_TAIL:]
        return f"{os.path.basename(self.cmd[0])} exited {self.returncode}" + (f": {tail}" if tail else "")


def run_process(argv: list[str], env: dict[str, str], work: str) -> ProcessUsage:
    """Run ``argv`` to its end, output to files in ``work``; its wall-clock time and
    its own peak RSS (``wait4``'s rusage, where ``RUSAGE_CHILDREN`` would give the
    largest of every child so far)."""
    with open(os.path.join(work, "proc.out"), "w+b") as out, open(os.path.join(work, "proc.err"), "w+b") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        took = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        stdout = out.read().decode(errors="replace")
        if proc.returncode != 0:
            err.seek(0)
            raise ProcessFailed(proc.returncode, argv, stdout, err.read().decode(errors="replace"))
    return ProcessUsage(took, usage.ru_maxrss / 1024, stdout)  # ru_maxrss: KiB on Linux


def slp_command() -> str:
    """The ``slp`` beside this interpreter (the venv's), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "slp")
    found = beside if os.access(beside, os.X_OK) else shutil.which("slp")
    if not found:
        raise ConfigError("the cli_* benchmarks run the slp command: none beside "
                          f"{sys.executable} nor on PATH (pip install -e .)")
    return found


def passed_overrides(overrides: Iterable[str]) -> list[str]:
    """The job's overrides its slp processes get too: the backend choice and its keys
    (``backend=s3``, ``backend.part_size_mb=16``), put/get settings, search paths."""
    from .sweep import parse_override

    kept = []
    for override in overrides:
        parsed = parse_override(str(override))
        if parsed and (parsed[0] == "backend" or parsed[0].startswith("backend.") or parsed[0] in PASSED_KEYS):
            kept.append(str(override))
    return kept


def backend_settings(backend: Backend, overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """The environment and extra overrides that point an slp process at ``backend``,
    as a user's shell would (the variables ``conf/backend/*.yaml`` read), plus the
    backend choice unless ``overrides`` already make it."""
    from .sweep import parse_override

    typed = {parsed[0] for parsed in map(parse_override, overrides) if parsed}
    fs, env, extra = backend.fs, {}, []
    if backend.name == "local":
        env["SLP_STORE_ROOT"] = backend.root
    elif backend.name == "seaweedfs":
        env.update(SLP_FILER_URL=fs.filer_url, SLP_FILER_ROOT=backend.root)
    elif backend.name == "s3":
        bucket, _, prefix = backend.root.partition("/")
        env["SLP_S3_BUCKET"] = bucket
        if fs.client_kwargs.get("endpoint_url"):
            env["SLP_S3_ENDPOINT"] = fs.client_kwargs["endpoint_url"]
        if fs.key:  # else the process finds them where this one did (~/.aws, the environment)
            env.update(AWS_ACCESS_KEY_ID=fs.key, AWS_SECRET_ACCESS_KEY=fs.secret or "")
        if prefix and "backend.root" not in typed:  # no variable names it
            extra.append(f"backend.root={prefix}")
    else:
        raise ConfigError(f"the cli_* benchmarks know no environment for backend {backend.name!r}")
    if "backend" not in typed:
        extra.insert(0, f"backend={backend.name}")
    return env, extra


def measure_cli(op: str, store: ArtifactStore, data: str, size: int, iterations: int, warmup: int,
                reference: bool, work: str, overrides: Iterable[str] = ()) -> tuple[Series, Series | None, dict]:
    """Time ``op`` (see the module's docstring) as processes; return slp's series, the
    reference's, and the metrics only whole processes have (floor, commands, ...)."""
    backend = store.backend
    # What earlier jobs wrote (weed's volumes: gigabytes, after the S3 puts) goes to disk
    # first, not while this job's processes write their own files.
    os.sync()
    passed = passed_overrides(overrides)
    backend_env, extra = backend_settings(backend, passed)
    args = [*extra, *passed]
    env = {**os.environ, **backend_env, "SLP_CACHE_DIR": os.path.join(work, "cache-none")}
    # slp hands each command to a resident server (slp_runner/server.py), as for a user
    # whose earlier commands started it: a folder of this job's (short enough for a
    # socket path), the server started before timing and stopped after. Each slp is also
    # timed in its own process (SLP_SERVER=off): a user's first command, or no server.
    served = env.get("SLP_SERVER", "").lower() not in ("off", "0", "false", "no")
    server_dir = tempfile.mkdtemp(prefix="slp-bench-") if served else None
    if server_dir:
        env.update(SLP_SERVER_DIR=server_dir, SLP_WORKER_RUSAGE=os.path.join(work, "worker-rusage.json"))
    alone_env = {**env, "SLP_SERVER": "off"}
    # slp remembers the config a command line composes to (slp_runner/compose.py): a
    # folder of this job's own, so that the warmup iterations, not whatever ran before,
    # leave it as a user's earlier commands would. A user's own setting (off) is kept.
    env.setdefault("SLP_COMPOSE_CACHE", os.path.join(work, "compose"))
    slp = slp_command()
    counter = iter(range(1_000_000))

    def run_slp(*task: str, cache: str | None = None, own_process: bool = False) -> ProcessUsage:
        """One slp process; without ``cache``, in a new empty cache removed after it. Its
        peak RSS is its server worker's where one ran the command (the larger)."""
        base = alone_env if own_process else env
        fresh = cache or os.path.join(work, f"cache-{next(counter)}")
        report = base.get("SLP_WORKER_RUSAGE")
        if report:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(report)
        try:
            usage = run_process([slp, *task, *args], {**base, "SLP_CACHE_DIR": fresh}, work)
        finally:
            if cache is None:
                shutil.rmtree(fresh, ignore_errors=True)
        if report and os.path.exists(report):
            with open(report) as f:
                worker_kib = json.load(f)["maxrss_kib"]
            usage = ProcessUsage(usage.seconds, max(usage.peak_rss_mib, worker_kib / 1024), usage.stdout)
        return usage

    def cleanup(oid: str) -> None:
        for path in (store.object_path(BLOB, oid), store.manifest_path(BLOB, oid)):
            if store.fs.exists(path):
                store.fs.rm(path)

    ours = Series(f"slp {backend.name} (process)", size)
    alone = Series(f"slp {backend.name} (own process, no server)", size)
    ref = floor = ref_tool = None
    task: list[str] = []
    ref_command = None
    stored_oid = None
    try:
        if server_dir:
            run_process([slp, "--start-server"], env, work)
        if op in ("cli_get", "cli_put") and reference:
            ref_tool = reference_for(backend)
            ref = Series(ref_tool.download_tool if op == "cli_get" else ref_tool.upload_tool, size)
        elif reference:
            ref, floor = Series(HYDRA_IMPORT, size), Series(FLOOR, size)
        if op != "cli_put":
            stored_oid = store.put(data, BLOB).oid
        if op == "cli_get" and ref_tool:
            ref_tool.upload(data)
        if op == "cli_hit":
            run_slp("task=get", f"hash={stored_oid}", cache=os.path.join(work, "cache-warm"))  # fills it, untimed

        dest = os.path.join(work, "ref.out")
        # slp, slp in its own process, the reference and (cli_hit, cli_ls) the floor take
        # turns: whole rounds, so that each went first as often as the others.
        turns = 2 + (0 if ref is None else 2 if floor is not None else 1)
        for i in range(warmup + -(-iterations // turns) * turns):
            record = i >= warmup
            if op == "cli_get":
                task = ["task=get", f"hash={stored_oid}"]
                steps = [lambda: ours.measure(lambda: run_slp(*task), record),
                         lambda: alone.measure(lambda: run_slp(*task, own_process=True), record)]
                if ref_tool:
                    ref_command = ref_tool.download_command(dest)

                    def download() -> None:
                        ref.measure(lambda: run_process(ref_command, env, work), record)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(dest)
                    steps.append(download)
            elif op == "cli_put":
                task = ["task=put", "kind=blob", f"path={data}"]

                def put(series: Series, own_process: bool) -> None:
                    refresh_head(data)  # new bytes: nothing is deduplicated
                    got = []
                    series.measure(lambda: got.append(run_slp(*task, own_process=own_process)) or got[-1], record)
                    for usage in got:
                        found = PUT_HASH_RE.search(usage.stdout)
                        cleanup(found.group(1) if found else hash_file(data).blake3)
                steps = [lambda: put(ours, False), lambda: put(alone, True)]
                if ref_tool:
                    ref_command = ref_tool.upload_command(data)

                    def upload() -> None:
                        refresh_head(data)
                        ref.measure(lambda: run_process(ref_command, env, work), record)
                    steps.append(upload)
            else:
                task = ["task=get", f"hash={stored_oid}"] if op == "cli_hit" else ["task=ls"]
                cache = os.path.join(work, "cache-warm") if op == "cli_hit" else None
                steps = [lambda: ours.measure(lambda: run_slp(*task, cache=cache), record),
                         lambda: alone.measure(lambda: run_slp(*task, cache=cache, own_process=True), record)]
                if ref is not None:
                    ref_command = [sys.executable, "-c", "import hydra"]
                    steps += [lambda: ref.measure(lambda: run_process(ref_command, env, work), record),
                              lambda: floor.measure(lambda: run_process([sys.executable, "-c", "pass"], env, work),
                                                    record)]
            for step in in_turn(steps, i - warmup):
                step()
    finally:
        if server_dir:
            with contextlib.suppress(Exception):
                run_process([slp, "--stop-server"], env, work)
            shutil.rmtree(server_dir, ignore_errors=True)
        if stored_oid:
            cleanup(stored_oid)
        if ref_tool:
            with contextlib.suppress(Exception):
                ref_tool.cleanup()
    if not ours.seconds and ours.errors:  # every slp process failed: say why, as the job's error
        raise RuntimeError(f"{op}: every slp process failed; the first: {ours.first_error}")

    shown = " ".join(["slp", *[t if not t.startswith(("hash=", "path=")) else t.split("=")[0] + "=<...>"
                               for t in task], *args])
    extra_metrics = {"command": shown, "environment": sorted(backend_env), "process": True}
    if ref_command:  # readable: the program's name, a script as <script>, no password in a URL
        extra_metrics["reference_command"] = shlex.join(
            [os.path.basename(ref_command[0]),
             *("<script>" if "\n" in a else strip_url_password(a) for a in ref_command[1:])])
    if floor is not None:
        extra_metrics["floor"] = floor.summary()
    if served and alone.seconds:
        extra_metrics["own_process"] = alone.summary()
    if ref is not None and ours.seconds and ref.seconds:
        # slp's median time over the reference's: the target for cli_hit is <= 1.6
        extra_metrics["time_ratio_to_reference"] = round(percentile(ours.seconds, 50) / percentile(ref.seconds, 50), 3)
    return ours, ref, extra_metrics
