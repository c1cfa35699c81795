"""The storage benchmark (the seed's slp_bench_storage), with its reference measured
in the same run: upload, download, roundtrip, hash and cache operations in this
process, and the ``cli_*`` operations as whole ``slp`` processes (:mod:`.cli_ops`).

Test data is generated before any timing; each iteration of an upload gets fresh
bytes (16 random bytes rewritten at the head of the file, outside the timer) so
that nothing is deduplicated. Iterations alternate slp and the reference tool so
that drift in the machine affects both alike, each going first in turn (:func:`in_turn`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from ..artifacts import BLOB
from ..cache import LocalCache
from ..errors import ConfigError
from ..hashing import hash_file
from ..stats import summarize
from ..store import ArtifactStore
from .references import b3sum_seconds, reference_for

MiB = 1024 * 1024
IN_PROCESS_OPS = ("upload", "download", "roundtrip", "hash", "cache")
CLI_OPS = ("cli_get", "cli_put", "cli_hit", "cli_ls")  # whole processes: see cli_ops
OPS = IN_PROCESS_OPS + CLI_OPS
PERCENTILES = "linear interpolation between closest ranks (numpy 'linear', R type 7); stdev is the sample one"


def make_data(path: str, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


def refresh_head(path: str) -> None:
    """New content, same size: the next upload cannot be deduplicated."""
    with open(path, "r+b") as f:
        f.write(os.urandom(16))


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
    except OSError:
        pass


_JOB_PEAK = [0.0]  # MiB: the job's peak before the last reset_for_step


def reset_for_step() -> None:
    """Before a timed step: note the job's peak so far, hand the heap memory freed
    since back to the system (glibc keeps it otherwise: boto3's threads' arenas would
    count as the next step's), and reset the peak to what is resident now."""
    _JOB_PEAK[0] = max(_JOB_PEAK[0], peak_rss_mib() or 0.0)
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_rss()


def job_peak_rss_mib() -> float | None:
    """This job's peak RSS, the steps' resets notwithstanding."""
    return max(_JOB_PEAK[0], peak_rss_mib() or 0.0) or None


def peak_rss_mib() -> float | None:
    return _status_mib("VmHWM")


def _status_mib(field: str) -> float | None:
    """A size from /proc/self/status (VmHWM: the peak RSS; VmRSS: resident now), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class ProcessUsage:
    """What a finished process leaves: its own wall-clock time, peak RSS (``ru_maxrss``
    from ``wait4``: this process alone, not its children) and standard output."""

    seconds: float
    peak_rss_mib: float
    stdout: str


class Series:
    """Timings of one tool: seconds per successful iteration, errors by type, and the
    peak RSS of each recorded run (``rss_mib``): the process's, for a tool run as one;
    for slp's steps in this process (``in_this_process``), this process's."""

    def __init__(self, tool: str, size: int, in_this_process: bool = False):
        self.tool, self.size = tool, size
        self.in_this_process = in_this_process
        self.seconds: list[float] = []
        self.errors: Counter[str] = Counter()
        self.first_error: str | None = None
        self.rss_mib: list[float] = []
        self.rss_growth_mib: list[float] = []  # in this process: the peak less what was resident before

    def measure(self, fn: Callable[[], object], record: bool) -> None:
        """Time ``fn`` (wall clock); keep the time only for a recorded iteration. When
        ``fn`` returns a :class:`ProcessUsage` (:func:`.cli_ops.run_process`), its own
        time and peak RSS; for a series ``in_this_process``, this process's peak RSS while
        ``fn`` ran (:func:`reset_for_step` first: what a reference run in this process,
        boto3's transfer manager, held is not slp's)."""
        try:
            resident = None
            if self.in_this_process:
                reset_for_step()
                resident = _status_mib("VmRSS")
            t0 = time.perf_counter()
            got = fn()
            took = time.perf_counter() - t0
        except Exception as exc:
            if record:
                self.errors[type(exc).__name__] += 1
                self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"[:500]
            return
        if record:
            if isinstance(got, ProcessUsage):  # spawn to exit, without opening its output files
                took = got.seconds
                self.rss_mib.append(got.peak_rss_mib)
            elif self.in_this_process and (peak := peak_rss_mib()) is not None:
                self.rss_mib.append(peak)
                if resident is not None:
                    self.rss_growth_mib.append(max(0.0, peak - resident))
            self.seconds.append(took)

    def runs(self) -> int:
        """Recorded iterations, failed ones included."""
        return len(self.seconds) + sum(self.errors.values())

    def summary(self) -> dict:
        n = self.runs()
        lat = summarize(s * 1000 for s in self.seconds)
        rates = summarize(self.size / MiB / s for s in self.seconds if s > 0)
        mean_s = lat.get("mean", 0) / 1000
        return {
            "tool": self.tool,
            "iterations_ms": [round(s * 1000, 3) for s in self.seconds],
            "latency_ms": {k: round(v, 3) for k, v in lat.items()},
            "mib_per_s": {k: round(v, 2) for k, v in rates.items()},
            "throughput_mib_s": round(self.size / MiB / mean_s, 2) if mean_s > 0 else None,
            "success_rate": round(len(self.seconds) / n, 4) if n else None,
            "errors": dict(self.errors),
            **({"first_error": self.first_error} if self.first_error else {}),
            **({"peak_rss_mib": round(max(self.rss_mib), 1)} if self.rss_mib else {}),
            **({"peak_rss_growth_mib": round(max(self.rss_growth_mib), 1)} if self.rss_growth_mib else {}),
        }


def run_storage_bench(store: ArtifactStore, *, op: str, size_mb: float, iterations: int = 5, warmup: int = 1,
                      reference: bool = True, workdir: str | None = None, log=None,
                      overrides: list[str] | tuple[str, ...] = (), min_seconds: float = 0.0,
                      max_iterations: int = 50) -> dict:
    """Measure one operation on one backend; return the metrics for the run manifest.
    ``overrides``: what the user typed that a ``cli_*`` op's slp processes get too
    (:func:`.cli_ops.passed_overrides`).

    In-process ops run at least ``iterations`` times, and more, up to ``max_iterations``,
    until slp's recorded iterations add up to ``min_seconds`` (as ``timeit``'s autorange
    does): a 16 MiB transfer of 25 ms is then timed up to 50 times, not 5, and one slow
    iteration moves the mean much less. The iterations run are in the metrics."""
    if op not in OPS:
        raise ConfigError(f"unknown benchmark op {op!r} (choose from {', '.join(OPS)})")
    size = int(size_mb * MiB)
    store.backend.ensure_writable()  # the reference writes beside the store (an S3 bucket must exist)
    work = tempfile.mkdtemp(prefix="slp-bench-", dir=workdir)
    reset_peak_rss()
    _JOB_PEAK[0] = 0.0
    try:
        data = os.path.join(work, "data.bin")
        make_data(data, size)
        hash_file(data)  # the page cache is warm for everyone
        extra: dict = {}
        if op in CLI_OPS:
            from .cli_ops import measure_cli

            ours, ref, extra = measure_cli(op, store, data, size, iterations, warmup, reference, work, overrides)
        else:
            ours, ref = _measure(op, store, data, size, iterations, warmup, reference, work,
                                 min_seconds, max(iterations, max_iterations))
        metrics = {"op": op, "backend": store.backend.name, "size_mb": size_mb, "size_bytes": size,
                   "iterations": ours.runs(), "warmup": warmup, "percentiles": PERCENTILES, "slp": ours.summary()}
        if ref is not None:
            metrics["reference"] = ref.summary()
            if op in CLI_OPS:  # processes: the median, which a slow start-up now and then does not move
                a, b = metrics["slp"]["latency_ms"].get("p50"), metrics["reference"]["latency_ms"].get("p50")
                metrics["ratio_to_reference"] = round(b / a, 3) if a and b else None
            else:
                a, b = metrics["slp"]["throughput_mib_s"], metrics["reference"]["throughput_mib_s"]
                metrics["ratio_to_reference"] = round(a / b, 3) if a and b else None
        metrics.update(extra)
        # What a user's slp process holds (a CLI op's; in-process, slp's steps' alone), not
        # this job's, which also ran the reference or only waited for slp's processes.
        metrics["peak_rss_mib"] = metrics["slp"].get("peak_rss_mib")
        metrics["job_peak_rss_mib"] = job_peak_rss_mib()
        return metrics
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(op, store, data, size, iterations, warmup, reference, work, min_seconds=0.0, max_iterations=50):
    ours = Series(f"slp {store.backend.name}", size, in_this_process=True)
    ref_tool = reference_for(store.backend) if reference and op in ("upload", "download", "roundtrip") else None
    ref = Series(ref_tool.name, size) if ref_tool else (Series("b3sum", size) if reference and op == "hash" else None)
    counter = iter(range(1_000_000))

    def fresh_cache() -> LocalCache:
        return LocalCache(os.path.join(work, f"cache-{next(counter)}"))

    def cleanup(oid: str) -> None:
        for path in (store.object_path(BLOB, oid), store.manifest_path(BLOB, oid)):
            if store.fs.exists(path):
                store.fs.rm(path)

    stored_oid, cold = None, None
    warm_cache = LocalCache(os.path.join(work, "cache-warm"))
    if op in ("download", "cache"):
        stored_oid = store.put(data, BLOB).oid
        if ref_tool:
            ref_tool.upload(data)
    turns = 2 if ref is not None else 1  # steps per iteration (the cache op's reference comes at the end)
    try:
        for i in range(warmup + max_iterations):
            record = i >= warmup
            # More only while slp works: a failing one is not timed again and again. Whole
            # rounds of turns, so that each tool went first as often as the other.
            if (record and ours.runs() >= iterations and (sum(ours.seconds) >= min_seconds or ours.errors)
                    and (i - warmup) % turns == 0):
                break
            if op == "cache":
                if cold is None:  # one cold get, then warm gets of the same artifact (stat-validated hits)
                    cold = Series("slp cold get (download)", size, in_this_process=True)
                    cold.measure(lambda: warm_cache.get(store, BLOB, stored_oid), True)
                steps = [lambda: ours.measure(lambda: warm_cache.get(store, BLOB, stored_oid), record)]
            else:
                steps = _steps(op, store, data, stored_oid, ours, ref, ref_tool, record, work, fresh_cache, cleanup)
            for step in in_turn(steps, i - warmup):
                step()
        if op == "cache":
            ours.tool = "slp warm get (stat-validated hit)"
            ref = cold  # the ratio is then the speed-up of a warm get over a cold one
    finally:
        if stored_oid:
            cleanup(stored_oid)
        if ref_tool:
            with contextlib.suppress(Exception):
                ref_tool.cleanup()
    return ours, ref


def in_turn(steps: list, i: int) -> list:
    """The steps of iteration ``i``, each tool first in turn: whoever runs after another
    pays for what it left the server busy with (a filer deleting the chunks of a 1 GiB
    file just removed or overwritten made the next upload about 500 ms slower, whichever
    tool sent it), so each takes every place equally often."""
    k = i % len(steps) if steps else 0
    return steps[k:] + steps[:k]


def _steps(op, store, data, stored_oid, ours, ref, ref_tool, record, work, fresh_cache, cleanup) -> list[Callable[[], None]]:
    """One iteration of ``op``: slp's timed step and the reference's (if any), each with
    its own untimed set-up and clean-up, in the order :func:`in_turn` then gives them."""

    def upload() -> None:
        refresh_head(data)  # new bytes: nothing is deduplicated
        puts = []
        ours.measure(lambda: puts.append(store.put(data, BLOB)), record)
        for put in puts:
            cleanup(put.oid)

    def download() -> None:
        cache = fresh_cache()
        ours.measure(lambda: cache.get(store, BLOB, stored_oid), record)
        shutil.rmtree(cache.root, ignore_errors=True)

    def roundtrip() -> None:
        refresh_head(data)
        cache = fresh_cache()

        def put_then_get():
            oid = store.put(data, BLOB).oid
            try:
                cache.get(store, BLOB, oid)  # streamed, hashed and checked on the way
            finally:
                cleanup(oid)

        ours.measure(put_then_get, record)
        shutil.rmtree(cache.root, ignore_errors=True)

    def reference(fn: Callable[[str], float], needs_fresh: bool) -> Callable[[], None]:
        def step() -> None:
            if needs_fresh:
                refresh_head(data)
            dest = os.path.join(work, "ref.out")
            ref.measure(lambda: fn(dest), record)
            if os.path.exists(dest):
                os.unlink(dest)
        return step

    if op == "hash":
        steps = [lambda: ours.measure(lambda: hash_file(data), record)]
        return steps + ([lambda: ref.measure(lambda: b3sum_seconds(data), record)] if ref else [])
    mine = {"upload": upload, "download": download, "roundtrip": roundtrip}[op]
    refs = {"upload": lambda dest: ref_tool.upload(data),
            "download": lambda dest: ref_tool.download(dest),
            "roundtrip": lambda dest: ref_tool.upload(data) + ref_tool.download(dest)}
    return [mine] + ([reference(refs[op], op != "download")] if ref else [])
