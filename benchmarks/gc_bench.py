"""What ``slp task=gc`` costs: time and backend requests for a dry run and an apply.

    python -m benchmarks.gc_bench --backend seaweedfs|s3|local --objects 1000

Fills a fresh store (its own SeaweedFS on free ports, in a temporary folder, for
seaweedfs and s3) with ``--objects`` small blobs, each published the way a put
publishes it (object, then a manifest built by :func:`manifest.build_manifest`) but
through ``store.put_bytes`` (``--fill bytes``, the default: a put re-reads the
object and its manifest first, which only slows the filling) or through
``store.put`` itself (``--fill put``). One run manifest in the backend's ``runs/``
references ``--keep-fraction`` of them. Then gc runs twice with ``grace=0``: a dry
run, and an apply that deletes the rest.

Requests are counted two ways: calls of the fsspec methods gc and the store use
(``ls``, ``info``, ``cat``, ``cat_file``, ``rm``, ``rm_file``, ``find``, ``exists``;
a method calling another counts both: on the filer ``rm_file`` asks ``exists`` first),
and, where the filesystem has one funnel for them, the HTTP requests it sends
(``SeaweedFSFileSystem._call`` and s3fs's ``_call_s3``; a bulk ``cat`` is one method
call but one request per file).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import sys
import tempfile
import time
import uuid
from typing import Any

import blake3
import orjson

from .. import manifest as manifests
from ..artifacts import BLOB
from ..backends import Backend, local_backend, s3_backend, seaweedfs_backend
from ..gc import collect_garbage
from ..hashing import FileDigest
from ..local_output import human
from ..pipeline.run_folder import new_run_id
from ..store import ArtifactStore

METHODS = ("ls", "info", "cat", "cat_file", "rm", "rm_file", "find", "exists")


class Counted:
    """Counts fsspec method calls and wire requests on one filesystem instance."""

    def __init__(self, fs: Any):
        self.fs = fs
        self.calls: collections.Counter[str] = collections.Counter()
        self.wire = 0
        self.wire_known = False
        for name in METHODS:
            original = getattr(fs, name)
            setattr(fs, name, self._method(name, original))
        if hasattr(fs, "_call") and type(fs).__name__ == "SeaweedFSFileSystem":
            original_call = fs._call

            def call(*args, **kwargs):
                self.wire += 1
                return original_call(*args, **kwargs)

            fs._call = call
            self.wire_known = True
        elif hasattr(fs, "_call_s3"):  # s3fs: every API request goes through it
            original_s3 = fs._call_s3

            async def call_s3(*args, **kwargs):
                self.wire += 1
                return await original_s3(*args, **kwargs)

            fs._call_s3 = call_s3
            self.wire_known = True

    def _method(self, name: str, original):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            return original(*args, **kwargs)

        return counted

    def reset(self) -> None:
        self.calls.clear()
        self.wire = 0

    def snapshot(self) -> dict[str, Any]:
        return {"calls": sum(self.calls.values()), "by_method": dict(sorted(self.calls.items())),
                "wire": self.wire if self.wire_known else None}


def make_backend(name: str, workdir: str, stack: contextlib.ExitStack) -> Backend:
    if name == "local":
        return local_backend(root=os.path.join(workdir, "store"))
    from ..seaweed_server import SeaweedServer, free_ports

    server = SeaweedServer(os.path.join(workdir, "seaweed"), free_ports()).start()
    stack.callback(server.stop, timeout=2)
    root = f"gc-bench-{uuid.uuid4().hex[:8]}"
    if name == "seaweedfs":
        return seaweedfs_backend(filer_url=server.filer_url, root=root)
    if name == "s3":
        return s3_backend(endpoint_url=server.s3_url, bucket="gc-bench", root=root, key=server.access_key,
                          secret=server.secret_key)
    raise SystemExit(f"unknown backend {name!r} (local, seaweedfs or s3)")


def fill(store: ArtifactStore, count: int, size: int, how: str, workdir: str) -> list[tuple[str, int]]:
    """``count`` distinct blobs of ``size`` bytes; returns (oid, size) of each."""
    stored = []
    for i in range(count):
        data = i.to_bytes(8, "big") + os.urandom(max(0, size - 8))
        if how == "put":
            path = os.path.join(workdir, "blob.bin")
            with open(path, "wb") as f:
                f.write(data)
            put = store.put(path, BLOB, tool="gc_bench")
            stored.append((put.oid, put.size))
            continue
        oid = blake3.blake3(data).hexdigest()
        store.put_bytes(data, BLOB.object_name(oid))
        record = manifests.build_manifest(BLOB, FileDigest(oid, len(data)), file_name=f"blob-{i}.bin",
                                          source="gc_bench", tool="gc_bench", verification="size",
                                          verified_at=manifests.utc_now())
        store.put_bytes(manifests.dumps(record), BLOB.manifest_name(oid))
        stored.append((oid, len(data)))
    return stored


def publish_run(store: ArtifactStore, kept: list[tuple[str, int]]) -> str:
    run_id = new_run_id(b"gc_bench")
    manifest = {"run_id": run_id, "pipeline": "gc_bench", "status": "completed", "start_time": manifests.utc_now(),
                "artifacts": {f"blob{i}": {"kind": "blob", "hash": oid, "size_bytes": size}
                              for i, (oid, size) in enumerate(kept)}}
    store.put_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2), f"runs/{run_id}/manifest.json")
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gc_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("local", "seaweedfs", "s3"), default="seaweedfs")
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1024, help="bytes per object (default 1024)")
    parser.add_argument("--keep-fraction", type=float, default=0.5, help="share referenced by the run (default 0.5)")
    parser.add_argument("--fill", choices=("bytes", "put"), default="bytes",
                        help="bytes: object and manifest through store.put_bytes (default); put: store.put")
    parser.add_argument("--workers", type=int, default=8, help="gc's workers: objects deleted at once (default 8)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gc-bench-"))
        backend = make_backend(args.backend, workdir, stack)
        store = ArtifactStore(backend)
        t0 = time.perf_counter()
        stored = fill(store, args.objects, args.size, args.fill, workdir)
        fill_seconds = time.perf_counter() - t0
        kept = stored[: round(len(stored) * args.keep_fraction)]
        publish_run(store, kept)
        counter = Counted(store.fs)
        runs_dir = os.path.join(workdir, "runs")  # empty: the run is only in the backend
        rows = []
        for phase, apply in (("dry run", False), ("apply", True)):
            counter.reset()
            t1 = time.perf_counter()
            report = collect_garbage(store, runs_dir=runs_dir, grace=0, apply=apply,
                                     workers=args.workers, out=io.StringIO())
            seconds = time.perf_counter() - t1
            rows.append({"phase": phase, "seconds": round(seconds, 3), "swept": len(report["swept"]),
                         "freed_bytes": report["freed_bytes"], "gc_requests": report["requests"],
                         **counter.snapshot()})
        counter.reset()
        left = store.list(BLOB)
        expected = {oid for oid, _ in kept}
        ok = {o["oid"] for o in left} == expected and rows[1]["swept"] == len(stored) - len(kept)
    result = {"backend": args.backend, "objects": args.objects, "size": args.size, "fill": args.fill,
              "workers": args.workers,
              "fill_seconds": round(fill_seconds, 3), "kept": len(kept), "rows": rows, "correct": ok}
    from benchmarks._report import out_dir

    folder = out_dir(f"gc-{args.backend}")  # runs/bench-gc-<backend>-<time>/results.json
    with open(os.path.join(folder, "results.json"), "wb") as f:
        f.write(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return 0 if ok else 1
    print(f"gc on {args.backend}: {args.objects} blobs of {args.size} B (filled with "
          f"{'store.put' if args.fill == 'put' else 'store.put_bytes'} in {fill_seconds:.1f} s), "
          f"{len(kept)} referenced by one run manifest in the backend, grace=0, workers={args.workers}")
    print(f"{'phase':8} | {'seconds':>8} | {'swept':>5} | {'freed':>9} | {'fs calls':>8} | {'HTTP':>6} | by method")
    print(f"{'-' * 8}-|-{'-' * 8}-|-{'-' * 5}-|-{'-' * 9}-|-{'-' * 8}-|-{'-' * 6}-|-{'-' * 30}")
    for r in rows:
        wire = "-" if r["wire"] is None else str(r["wire"])
        methods = " ".join(f"{k}={v}" for k, v in r["by_method"].items())
        print(f"{r['phase']:8} | {r['seconds']:>8.3f} | {r['swept']:>5} | {human(r['freed_bytes']):>9} | "
              f"{r['calls']:>8} | {wire:>6} | {methods}")
    print(f"after apply: {len(left)} objects left, {'exactly the referenced ones' if ok else 'NOT the referenced set'}")
    print(f"results in {folder}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
