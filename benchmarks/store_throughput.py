"""Put and get throughput of the store on every backend, beside curl on the same filer,
and peak RSS of put and get as the file grows.

    python -m benchmarks.store_throughput [--size-mb 256] [--reps 3] [--rss-sizes-mb 64,1024]

Starts its own SeaweedFS on free loopback ports. Test data is generated before any
timing; the page cache is warm (the file is read once first). Each figure is the
median of ``--reps`` runs. Results: ``runs/bench-store-<time>/results.json`` and
``summary.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from benchmarks._report import out_dir, publish
from slp_runner.artifacts import BLOB
from slp_runner.backends import Backend, local_backend, s3_backend, seaweedfs_backend
from slp_runner.cache import LocalCache
from slp_runner.seaweed_server import SeaweedServer, free_ports
from slp_runner.store import ArtifactStore

MiB = 1024 * 1024


def make_file(path: str, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(block[i % 7 :] + block[: i % 7])  # distinct blocks, cheap to make
    with open(path, "rb") as f:  # warm the page cache
        while f.read(16 * MiB):
            pass


def backends_for(server: SeaweedServer, workdir: str) -> dict[str, callable]:
    return {
        "local": lambda: local_backend(os.path.join(workdir, "store", uuid.uuid4().hex[:8])),
        "seaweedfs": lambda: seaweedfs_backend(server.filer_url, root=f"bench-{uuid.uuid4().hex[:8]}"),
        "s3": lambda: s3_backend(server.s3_url, bucket="bench", root=uuid.uuid4().hex[:8],
                                 key=server.access_key, secret=server.secret_key),
    }


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def curl(server: SeaweedServer, path: str, workdir: str) -> tuple[float, float]:
    name = f"curl/{uuid.uuid4().hex}"
    url = f"{server.filer_url}/{name}"
    put = timed(lambda: subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", "-T", path, url], check=True))
    out = os.path.join(workdir, "curl.out")
    get = timed(lambda: subprocess.run(["curl", "-sS", "-f", "-o", out, url], check=True))
    os.unlink(out)
    return put, get


def slp_put_get(make_backend, path: str, workdir: str) -> tuple[float, float]:
    backend: Backend = make_backend()
    store = ArtifactStore(backend)
    put = timed(lambda: store.put(path, BLOB))
    oid = store.put(path, BLOB).oid  # deduplicated: just the hash
    cache = LocalCache(os.path.join(workdir, "cache", uuid.uuid4().hex[:8]))
    get = timed(lambda: cache.get(store, BLOB, oid))
    hit = timed(lambda: cache.get(store, BLOB, oid))
    shutil.rmtree(cache.root)
    with_cleanup(backend)
    return put, get, hit


def with_cleanup(backend: Backend) -> None:
    try:
        backend.fs.rm(backend.root, recursive=True)
    except Exception:
        pass


RSS_PROBE = r"""
import sys
from benchmarks.store_throughput import probe
probe(*sys.argv[1:])
# VmHWM is the peak RSS of this program's own address space (ru_maxrss would also
# count the parent's pages from before exec).
print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


def probe(op: str, backend_name: str, path: str, workdir: str, filer: str, s3: str, key: str, secret: str):
    makers = {
        "local": lambda: local_backend(f"{workdir}/rss-store"),
        "seaweedfs": lambda: seaweedfs_backend(filer, root="rss"),
        "s3": lambda: s3_backend(s3, bucket="rss", key=key, secret=secret),
    }
    store = ArtifactStore(makers[backend_name]())
    if op == "put":
        store.put(path, BLOB)
    else:
        from slp_runner.hashing import hash_file

        LocalCache(f"{workdir}/rss-cache-{uuid.uuid4().hex[:6]}").get(store, BLOB, hash_file(path).blake3)


def peak_rss_mib(args: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, *args], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024  # KiB


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rss-sizes-mb", default="64,1024")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    folder = args.out or out_dir("store")
    os.makedirs(folder, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="slp-bench-")
    server = SeaweedServer(os.path.join(workdir, "seaweed"), free_ports()).start()
    results = {"size_mb": args.size_mb, "reps": args.reps, "throughput": {}, "peak_rss_mib": {}}
    try:
        path = os.path.join(workdir, "data.bin")
        make_file(path, args.size_mb * MiB)
        mib = args.size_mb

        rows = {}
        curl_runs = [curl(server, path, workdir) for _ in range(args.reps)]
        rows["curl (filer)"] = {
            "put_mib_s": mib / statistics.median(p for p, _ in curl_runs),
            "get_mib_s": mib / statistics.median(g for _, g in curl_runs),
        }
        for name, make in backends_for(server, workdir).items():
            runs = [slp_put_get(make, path, workdir) for _ in range(args.reps)]
            rows[f"slp {name}"] = {
                "put_mib_s": mib / statistics.median(r[0] for r in runs),
                "get_mib_s": mib / statistics.median(r[1] for r in runs),
                "warm_get_ms": 1000 * statistics.median(r[2] for r in runs),
            }
        results["throughput"] = rows

        for size_mb in [int(s) for s in args.rss_sizes_mb.split(",") if s]:
            rpath = os.path.join(workdir, f"rss-{size_mb}.bin")
            make_file(rpath, size_mb * MiB)
            for name in ("local", "seaweedfs", "s3"):
                common = [name, rpath, workdir, server.filer_url, server.s3_url, server.access_key, server.secret_key]
                results["peak_rss_mib"][f"{name} {size_mb} MiB"] = {
                    "put": peak_rss_mib(["put", *common]),
                    "get": peak_rss_mib(["get", *common]),
                }
            os.unlink(rpath)
    finally:
        server.stop(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)

    lines = [f"# Store throughput, {args.size_mb} MiB file, median of {args.reps} (page cache warm)", "",
             "| client | put MiB/s | get MiB/s | put / curl | get / curl | warm get ms |", "|---|---|---|---|---|---|"]
    ref = rows["curl (filer)"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['put_mib_s']:.0f} | {r['get_mib_s']:.0f} | {r['put_mib_s'] / ref['put_mib_s']:.2f} "
                     f"| {r['get_mib_s'] / ref['get_mib_s']:.2f} | {r.get('warm_get_ms', float('nan')):.2f} |")
    lines += ["", "slp put = hash + upload + size check + rename + manifest; slp get = streamed download "
              "+ inline BLAKE3 + rename into the cache.", "",
              "| backend, file | put peak RSS MiB | get peak RSS MiB |", "|---|---|---|"]
    for name, r in results["peak_rss_mib"].items():
        lines.append(f"| {name} | {r['put']:.0f} | {r['get']:.0f} |")
    publish(folder, lines, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
