"""What a cache hit costs in-process, and what LRU bookkeeping adds to it.

    python -m benchmarks.cache_hit [--hits 5000] [--entries 1000]

Puts one 1 MiB blob in a local store, fetches it once, then times ``--hits`` hits of
``LocalCache.get`` (the stat check, the record read, and, where the cache keeps a
size cap, the last-use ``utime`` and the hold). Run it on two checkouts (PYTHONPATH)
to compare. With ``--entries``, it also fills a cache with that many small entries and
times a full prune listing (``cache_lru.prune`` with apply=False) and an eviction of
half of them, where this checkout has them. Results: ``runs/bench-cache-hit-<time>/``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from benchmarks._report import out_dir, publish
from slp_runner.artifacts import BLOB
from slp_runner.backends import local_backend
from slp_runner.cache import LocalCache
from slp_runner.store import ArtifactStore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hits", type=int, default=5000)
    ap.add_argument("--entries", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(local_backend(root=os.path.join(tmp, "store")))
        path = os.path.join(tmp, "blob.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20))
        oid = store.put(path, BLOB).oid
        cache = LocalCache(os.path.join(tmp, "cache"))
        cache.get(store, BLOB, oid)
        times = []
        for _ in range(args.hits):
            t0 = time.perf_counter()
            got = cache.get(store, BLOB, oid)
            times.append(time.perf_counter() - t0)
            assert got.cache_hit
        times.sort()
        hit = {"median_us": statistics.median(times) * 1e6, "p95_us": times[int(len(times) * 0.95)] * 1e6,
               "hits": args.hits}
        lines = ["# Cache hit, in-process", "", f"LocalCache.get hit, {args.hits} hits: median "
                 f"{hit['median_us']:.1f} µs, p95 {hit['p95_us']:.1f} µs", ""]
        results = {"hit": hit}
        try:
            from slp_runner import cache_lru
        except ImportError:
            cache_lru = None
        if cache_lru is not None and args.entries:
            big = LocalCache(os.path.join(tmp, "cache-many"))
            for i in range(args.entries):
                with open(path, "wb") as f:
                    f.write(i.to_bytes(8, "big") * 16)
                big.get(store, BLOB, store.put(path, BLOB).oid)
            big.release()
            t0 = time.perf_counter()
            dry = cache_lru.prune(big.root, None, apply=False, everything=True)
            listing = time.perf_counter() - t0
            total = dry.total_before
            t0 = time.perf_counter()
            done = cache_lru.prune(big.root, total // 2)
            evicting = time.perf_counter() - t0
            results["prune"] = {"entries": args.entries, "list_s": listing, "evict_s": evicting,
                                "evicted": len(done.evicted)}
            lines += [f"prune over {args.entries} entries: list and rank {listing * 1000:.1f} ms; "
                      f"evict {len(done.evicted)} of them {evicting * 1000:.1f} ms"]
        publish(out_dir("cache-hit"), lines, results)


if __name__ == "__main__":
    main()
