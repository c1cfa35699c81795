"""Put and get throughput of the store on every backend, beside the plain tools on the
same server (curl on the filer, boto3's transfer manager on the S3 gateway), the
requests each put and get makes, and peak RSS of put and get as the file grows.

    python -m benchmarks.store_throughput [--size-mb 16,256,1024] [--reps 3] [--rss-sizes-mb 64,1024]

Starts its own SeaweedFS on free loopback ports. Test data is generated before any
timing; the page cache is warm (the file is read once first), and every client runs
once untimed first (weed grows volumes on the first writes). Within a repetition
every client runs once, in turn, so drift in the machine affects all alike; each
figure is the median of ``--reps`` runs. Each slp put goes to a fresh root (never
deduplicated). Results: ``runs/bench-store-<time>/results.json`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter

from benchmarks._report import out_dir, publish
from slp_runner.artifacts import BLOB
from slp_runner.backends import Backend, local_backend, s3_backend, seaweedfs_backend
from slp_runner.bench.references import Boto3S3, CurlFiler
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


def reference_put_get(make_reference, path: str, workdir: str) -> tuple[float, float]:
    ref = make_reference()
    out = os.path.join(workdir, "reference.out")
    try:
        put = ref.upload(path)
        get = ref.download(out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
        ref.cleanup()
    return put, get


def slp_put_get(make_backend, path: str, workdir: str) -> tuple[float, float, float]:
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


@contextlib.contextmanager
def counting_requests(backend: Backend):
    """Count the HTTP requests a backend sends, by method and operation."""
    counts: Counter = Counter()
    if backend.name == "seaweedfs":
        def hook(resp, *args, **kwargs):
            query = resp.request.url.partition("?")[2]
            op = "metadata" if "metadata=" in query else "mv" if "mv.from=" in query else \
                 "list" if resp.request.url.split("?")[0].endswith("/") else "append" if "op=append" in query else ""
            counts[f"{resp.request.method} {op}".strip()] += 1

        hooks = backend.fs.session.hooks["response"]
        hooks.append(hook)
        try:
            yield counts
        finally:
            hooks.remove(hook)
    elif backend.name == "s3":
        backend.fs.connect()

        def before_send(request, event_name, **kwargs):
            counts[event_name.rsplit(".", 1)[-1]] += 1

        from slp_runner.backends.s3_multipart import parts_client

        emitters = [backend.fs.s3.meta.events, parts_client(backend.fs, 4).meta.events]  # s3fs's, the parts'
        for events in emitters:
            events.register("before-send.s3", before_send)
        try:
            yield counts
        finally:
            for events in emitters:
                events.unregister("before-send.s3", before_send)
    else:
        yield counts


def request_counts(make_backend, path: str, workdir: str) -> dict[str, dict[str, int]]:
    backend: Backend = make_backend()
    store = ArtifactStore(backend)
    backend.ensure_writable()  # a bucket made once per backend is not a put's cost
    out = {}
    with counting_requests(backend) as counts:
        oid = store.put(path, BLOB).oid
    out["put (new)"] = dict(counts)
    with counting_requests(backend) as counts:
        store.put(path, BLOB)
    out["put (deduplicated)"] = dict(counts)
    cache = LocalCache(os.path.join(workdir, "cache", uuid.uuid4().hex[:8]))
    with counting_requests(backend) as counts:
        cache.get(store, BLOB, oid)
    out["get (cache fill)"] = dict(counts)
    shutil.rmtree(cache.root)
    with_cleanup(backend)
    return out


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
    ap.add_argument("--size-mb", default="256", help="file sizes, comma-separated (16,256,1024)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rss-sizes-mb", default="64,1024")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in str(args.size_mb).split(",") if s]

    folder = args.out or out_dir("store")
    os.makedirs(folder, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="slp-bench-")
    server = SeaweedServer(os.path.join(workdir, "seaweed"), free_ports()).start()
    results = {"sizes_mb": sizes, "reps": args.reps, "throughput": {}, "requests": {}, "peak_rss_mib": {}}
    try:
        makers = backends_for(server, workdir)
        clients = {
            "curl (filer)": lambda p: reference_put_get(lambda: CurlFiler(makers["seaweedfs"]()), p, workdir),
            "slp seaweedfs": lambda p: slp_put_get(makers["seaweedfs"], p, workdir),
            "boto3 (s3)": lambda p: reference_put_get(lambda: Boto3S3(makers["s3"]()), p, workdir),
            "slp s3": lambda p: slp_put_get(makers["s3"], p, workdir),
            "slp local": lambda p: slp_put_get(makers["local"], p, workdir),
        }
        for mib in sizes:
            path = os.path.join(workdir, "data.bin")
            make_file(path, mib * MiB)
            if mib == sizes[0]:  # untimed: the first writes make the bucket and grow volumes
                for run in clients.values():
                    run(path)
            runs: dict[str, list] = {name: [] for name in clients}
            for _ in range(args.reps):
                for name, run in clients.items():
                    runs[name].append(run(path))
            rows = {}
            for name, rs in runs.items():
                rows[name] = {"put_mib_s": mib / statistics.median(r[0] for r in rs),
                              "get_mib_s": mib / statistics.median(r[1] for r in rs)}
                if len(rs[0]) > 2:
                    rows[name]["warm_get_ms"] = 1000 * statistics.median(r[2] for r in rs)
            results["throughput"][str(mib)] = rows
            if mib == sizes[0]:
                results["requests"] = {name: request_counts(makers[name], path, workdir) for name in ("seaweedfs", "s3")}
            os.unlink(path)

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

    refs = {"slp seaweedfs": "curl (filer)", "slp s3": "boto3 (s3)"}
    lines = []
    for mib, rows in results["throughput"].items():
        lines += [f"# Store throughput, {mib} MiB file, median of {args.reps} (page cache warm)", "",
                  "| client | put MiB/s | get MiB/s | put / ref | get / ref | warm get ms |", "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            ref = rows.get(refs.get(name, ""))
            put_ratio = f"{r['put_mib_s'] / ref['put_mib_s']:.2f}" if ref else ""
            get_ratio = f"{r['get_mib_s'] / ref['get_mib_s']:.2f}" if ref else ""
            warm = f"{r['warm_get_ms']:.2f}" if "warm_get_ms" in r else ""
            lines.append(f"| {name} | {r['put_mib_s']:.0f} | {r['get_mib_s']:.0f} | {put_ratio} | {get_ratio} | {warm} |")
        lines.append("")
    lines += ["ref: curl -T / curl -o on the filer, boto3 upload_file / download_file (default TransferConfig) on S3.",
              "slp put = hash + upload + verification + publish + manifest; slp get = cache fill (streamed "
              "download + inline BLAKE3 + rename into the cache).", "",
              f"## Requests ({sizes[0]} MiB file)", "", "| backend | operation | requests |", "|---|---|---|"]
    for name, ops in results["requests"].items():
        for op, counts in ops.items():
            detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            lines.append(f"| {name} | {op} | {sum(counts.values())}: {detail} |")
    lines += ["", "| backend, file | put peak RSS MiB | get peak RSS MiB |", "|---|---|---|"]
    for name, r in results["peak_rss_mib"].items():
        lines.append(f"| {name} | {r['put']:.0f} | {r['get']:.0f} |")
    publish(folder, lines, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
