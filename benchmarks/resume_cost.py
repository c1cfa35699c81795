"""What a resumed download costs: a get cut at 90% and resumed, beside a fresh get of
the same object from the same filer, in the same run.

    python -m benchmarks.resume_cost [--size-mb 256] [--reps 3] [--cut 0.9]

Starts its own SeaweedFS on free loopback ports and puts one object on the filer.
Every get goes through the test suite's TCP fault proxy (tests/faultproxy.py), into
an empty cache, and is timed whole, in-process (``LocalCache.get``: the requests, the
hashing, the final BLAKE3 check, the rename). Three kinds, alternating per repetition:

- ``fresh``: nothing goes wrong;
- ``cut, in-process``: the first connection is cut at ``--cut`` of the object's bytes;
  the same get continues with a ranged GET (``Range: bytes=N-``);
- ``cut, restarted``: the same cut with ``retries=0``, so the get gives up and keeps its
  partial file; a second get re-hashes the kept prefix and fetches the rest. Timed:
  the second get alone, and both together.

The order of the three rotates per repetition and dirty pages are synced before each
timed get, so none pays for another's writeback. Each figure is the median of ``--reps``. Results: ``runs/bench-resume-cost-<time>/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

from benchmarks._report import out_dir, publish
from slp_runner.artifacts import BLOB
from slp_runner.backends import seaweedfs_backend
from slp_runner.cache import LocalCache
from slp_runner.errors import BackendError
from slp_runner.seaweed_server import SeaweedServer, free_ports
from slp_runner.store import ArtifactStore

# The proxy lives with the tests that use it; the benchmark borrows it as it is.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from faultproxy import FaultProxy  # noqa: E402

MiB = 1024 * 1024


def make_file(path: str, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(block[i % 251 :] + block[: i % 251])


def timed_get(store: ArtifactStore, oid: str, cache_root: str):
    os.sync()  # the last get's dirty pages are written back before, not during, this one
    t0 = time.perf_counter()
    got = LocalCache(cache_root).get(store, BLOB, oid)
    return time.perf_counter() - t0, got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cut", type=float, default=0.9)
    args = parser.parse_args()
    size = args.size_mb * MiB
    workdir = tempfile.mkdtemp(prefix="slp-resume-")
    server = SeaweedServer(os.path.join(workdir, "seaweed"), free_ports()).start()
    proxy = FaultProxy(server.ports.filer)
    samples: dict[str, list[float]] = {"fresh": [], "cut, in-process": [], "cut, restarted (second get)": [],
                                       "cut, restarted (both gets)": []}
    wire: dict[str, list[int]] = {k: [] for k in samples}
    try:
        root = f"bench-{uuid.uuid4().hex[:8]}"
        blob = os.path.join(workdir, "blob.bin")
        make_file(blob, size)
        oid = ArtifactStore(seaweedfs_backend(server.filer_url, root=root)).put(blob, BLOB).oid
        # A new store (and HTTP session) per get: a pooled connection opened before a
        # fault was set would not count as one of the proxy's "first" connections.
        def via():
            return ArtifactStore(seaweedfs_backend(proxy.url, root=root))

        def once():
            return ArtifactStore(seaweedfs_backend(proxy.url, root=root, retries=0))

        def cache_dir() -> str:
            return os.path.join(workdir, "cache", uuid.uuid4().hex[:8])

        def fresh() -> None:
            proxy.heal()
            before = proxy.bytes_down
            seconds, got = timed_get(via(), oid, cache_dir())
            assert got.reconnects == 0
            samples["fresh"].append(seconds)
            wire["fresh"].append(proxy.bytes_down - before)

        def in_process() -> None:
            proxy.heal()
            proxy.drop_after_down, proxy.drop_first = int(size * args.cut), 1
            before = proxy.bytes_down
            seconds, got = timed_get(via(), oid, cache_dir())
            assert got.reconnects == 1, got
            samples["cut, in-process"].append(seconds)
            wire["cut, in-process"].append(proxy.bytes_down - before)

        def restarted() -> None:
            proxy.heal()
            proxy.drop_after_down, proxy.drop_first = int(size * args.cut), 1
            root_dir = cache_dir()
            before = proxy.bytes_down
            os.sync()
            t0 = time.perf_counter()
            try:
                LocalCache(root_dir).get(once(), BLOB, oid)
                raise AssertionError("the cut get did not fail")
            except BackendError:
                pass
            first = time.perf_counter() - t0
            proxy.heal()
            between = proxy.bytes_down
            seconds, got = timed_get(once(), oid, root_dir)
            assert got.resumed_from > 0, got
            samples["cut, restarted (second get)"].append(seconds)
            samples["cut, restarted (both gets)"].append(first + seconds)
            wire["cut, restarted (second get)"].append(proxy.bytes_down - between)
            wire["cut, restarted (both gets)"].append(proxy.bytes_down - before)

        kinds = [fresh, in_process, restarted]
        for rep in range(args.reps):
            for run in kinds[rep % 3:] + kinds[: rep % 3]:  # rotate: no kind always goes first
                run()
            print(f"rep {rep + 1}/{args.reps}: fresh {samples['fresh'][-1]:.2f} s, "
                  f"in-process {samples['cut, in-process'][-1]:.2f} s, "
                  f"restarted {samples['cut, restarted (both gets)'][-1]:.2f} s", flush=True)
            shutil.rmtree(os.path.join(workdir, "cache"))
    finally:
        proxy.close()
        server.stop(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)

    fresh = statistics.median(samples["fresh"])
    results = {"size_bytes": size, "cut_fraction": args.cut, "reps": args.reps, "kinds": {}}
    lines = [f"# Resume cost: {args.size_mb} MiB get through the fault proxy, cut at {args.cut:.0%}",
             "", f"median of {args.reps}; every get into an empty cache, timed whole in-process", "",
             "| get | seconds | MiB/s | vs fresh | MiB over the wire |", "|---|---|---|---|---|"]
    for kind, values in samples.items():
        med = statistics.median(values)
        over_wire = statistics.median(wire[kind]) / MiB
        results["kinds"][kind] = {"seconds": values, "median_s": med, "mib_per_s": args.size_mb / med,
                                  "ratio_to_fresh": med / fresh, "wire_bytes": wire[kind]}
        lines.append(f"| {kind} | {med:.2f} | {args.size_mb / med:.0f} | {med / fresh:.2f}x | {over_wire:.1f} |")
    publish(out_dir("resume-cost"), lines, results)


if __name__ == "__main__":
    main()
