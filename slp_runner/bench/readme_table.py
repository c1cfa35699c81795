"""The README's performance table, regenerated from the sweep summaries of one
``make bench`` run::

    python -m slp_runner.bench.readme_table runs/bench-<time> [--readme README.md]

Each row is one thing a user does (backend, operation, size); the in-process figure
(the storage API inside a job) and the whole-process one (``slp ...`` as typed, timed
from spawn to exit) side by side, each beside its reference tool. Only the text
between ``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->`` is rewritten.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import platform
import sys
from typing import Any

import orjson

from .sweep import RESULT, parse_override

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
# op -> (what the user does, measured in-process or as whole processes)
OPS = {
    "upload": ("put", "in"), "cli_put": ("put", "process"),
    "download": ("get, empty cache", "in"), "cli_get": ("get, empty cache", "process"),
    "cache": ("get, cache hit", "in"), "cli_hit": ("get, cache hit", "process"),
    "cli_ls": ("ls", "process"),
    "hash": ("BLAKE3 of a file", "in"), "roundtrip": ("put, then get", "in"),
}
ORDER = ["put", "get, empty cache", "get, cache hit", "ls", "BLAKE3 of a file", "put, then get"]
BACKENDS = ["local", "seaweedfs", "s3"]
TRANSFERS = ("upload", "download", "roundtrip", "hash", "cli_put", "cli_get")  # a MiB/s means something
TARGETS = {"cli_hit": 1.6, "cli_ls": 1.6}  # issue 11: slp's start-up at most 1.6x `import hydra`'s


def _num(v: Any) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1000:.2f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _rate(mib_s: float | None) -> str:
    return "-" if not mib_s else f"{mib_s:.0f} MiB/s" if mib_s >= 10 else f"{mib_s:.2g} MiB/s"


def read_sweeps(run_dir: str) -> list[tuple[str, list[dict]]]:
    """(sweep name, rows of its summary.csv) for every sweep of the run, in name order."""
    found = sorted(glob.glob(os.path.join(run_dir, "*", "summary.csv")))
    if os.path.exists(os.path.join(run_dir, "summary.csv")):
        found.insert(0, os.path.join(run_dir, "summary.csv"))
    sweeps = []
    for path in found:
        with open(path, newline="") as f:
            sweeps.append((os.path.relpath(os.path.dirname(path), run_dir), list(csv.DictReader(f))))
    return sweeps


def _cells(row: dict, side: str) -> tuple[str, str, str]:
    """slp, reference and ratio cells: in-process at the mean latency (as the sweep's
    MiB/s and ratio), whole processes at the median."""
    if row.get("status") != "completed":
        return "failed", "-", "-"
    op, size = row["op"], _num(row.get("size_mb")) or 0

    def cell(mib_s: float | None, p50_ms: float | None) -> str:
        if side == "in":
            seconds = size / mib_s if mib_s else None
        else:
            seconds = p50_ms / 1000 if p50_ms is not None else None
            mib_s = size / seconds if seconds else None
        return _time(seconds) + (f" · {_rate(mib_s)}" if op in TRANSFERS and mib_s else "")

    slp = cell(_num(row.get("slp_mib_s")), _num(row.get("slp_p50_ms")))
    ref = "-"
    if row.get("reference"):
        ref = f"{row['reference']}: {cell(_num(row.get('reference_mib_s')), _num(row.get('reference_p50_ms')))}"
    ratio = _num(row.get("ratio"))
    return slp, ref, "-" if ratio is None else f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}"


def _iterations(rows: list[dict]) -> str:
    found = set()
    for r in rows:
        given = dict(filter(None, map(parse_override, str(r.get("overrides") or "").split())))
        found.add(str(given.get("bench.iterations", "default")))
    return "/".join(sorted(found))


def _machine(run_dir: str, sweeps: list[tuple[str, list[dict]]]) -> str:
    """Where and when: from a job's run manifest (its ``system``), else this machine."""
    for name, _ in sweeps:
        for result_path in sorted(glob.glob(os.path.join(run_dir, name, "*", RESULT))):
            with open(result_path, "rb") as f:
                folder = orjson.loads(f.read()).get("folder")
            manifest = os.path.join(folder or "", "manifest.json")
            if folder and os.path.exists(manifest):
                with open(manifest, "rb") as f:
                    m = orjson.loads(f.read())
                s = m.get("system") or {}
                git = s.get("git") or {}
                commit = f", commit {git['commit'][:10]}{' (uncommitted changes)' if git.get('dirty') else ''}" \
                    if git.get("commit") else ""
                return (f"{str(m.get('start_time', ''))[:10]} on {s.get('cpu', '?')}, {s.get('cpu_count', '?')} "
                        f"cores, {s.get('os', '?')}, Python {s.get('python', '?')}{commit}")
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def build_table(run_dir: str) -> str:
    """The markdown between the markers: the table and what it measured."""
    sweeps = read_sweeps(run_dir)
    if not sweeps:
        raise FileNotFoundError(f"no sweep summary (*/summary.csv) under {run_dir}")
    cells: dict[tuple, dict[str, dict]] = {}
    rss: dict[tuple, str] = {}
    notes = []
    for _, rows in sweeps:
        for r in rows:
            if r.get("op") not in OPS:
                continue
            what, side = OPS[r["op"]]
            size = None if r["op"] == "cli_ls" else _num(r.get("size_mb"))
            key = (r.get("backend") or "?", what, size)
            cells.setdefault(key, {})[side] = r
            if side == "process" and _num(r.get("peak_rss_mib")):
                rss[key] = f"{_num(r['peak_rss_mib']):.0f} MiB"
            target = TARGETS.get(r["op"])
            slp, ref = _num(r.get("slp_p50_ms")), _num(r.get("reference_p50_ms"))
            if target and slp and ref and r.get("status") == "completed":
                floor = _num(r.get("floor_p50_ms"))
                notes.append(f"`slp {'task=get' if r['op'] == 'cli_hit' else 'task=ls'}` "
                             f"({r['backend']}{', cache hit' if r['op'] == 'cli_hit' else ''}) takes "
                             f"{slp / ref:.2f}x the time of `{r.get('reference')}` (target: at most {target}x)"
                             + (f"; `{r.get('floor')}` takes {_time(floor / 1000)}" if floor is not None else ""))

    def order(key: tuple) -> tuple:
        backend, what, size = key
        return (BACKENDS.index(backend) if backend in BACKENDS else len(BACKENDS), backend,
                ORDER.index(what) if what in ORDER else len(ORDER), size or 0)

    lines = ["| what | in-process: slp | reference | ratio | whole process: slp | reference | ratio | "
             "slp, own process | slp peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(cells, key=order):
        backend, what, size = key
        row = cells[key]
        inside = _cells(row["in"], "in") if "in" in row else ("-", "-", "-")
        whole = _cells(row["process"], "process") if "process" in row else ("-", "-", "-")
        alone = _num((row.get("process") or {}).get("own_process_p50_ms"))
        label = f"{backend}: {what}" + (f", {size:g} MiB" if size is not None else "")
        lines.append("| " + " | ".join([label, *inside, *whole, _time(alone / 1000) if alone else "-",
                                         rss.get(key, "-")]).replace("\n", " ") + " |")
    sweeps_done = ", ".join(f"{name} ({_iterations(rows)} iterations)" for name, rows in sweeps)
    lines += [
        "",
        f"Measured {_machine(run_dir, sweeps)}; run folder `{run_dir.rstrip('/')}`, sweeps: {sweeps_done}.",
        "In-process: the storage API inside a benchmark job, slp and the reference alternating, at least "
        "that many iterations each and more (up to `bench.max_iterations`) until slp's add up to "
        "`bench.min_seconds`; time = mean latency, MiB/s = size / mean, "
        "ratio = slp MiB/s / reference MiB/s. Whole process: the command a user types (`slp task=get hash=<h>`, "
        "`slp task=put kind=blob path=<file>`, `slp task=ls`, with the backend in the environment), wall clock "
        "from spawn to exit; time = median, ratio = reference median / slp median. A ratio above 1: slp is faster. "
        "`slp` hands a command to its resident server (started by an earlier command); \"own process\" is the "
        "same command run in its own process (`SLP_SERVER=off`, or a first command), median. Peak RSS: the slp "
        "process's, or its server worker's. "
        "For the in-process cache hit the reference is slp's own cold get.",
        *[f"- {n}." for n in notes],
        "",
        f"Regenerated by `python -m slp_runner.bench.readme_table {run_dir.rstrip('/')}` (the end of `make bench`).",
    ]
    return "\n".join(lines)


def rewrite(readme: str, table: str) -> None:
    """Put ``table`` between the markers of ``readme``; nothing else changes."""
    with open(readme) as f:
        text = f.read()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{readme}: no {START} ... {END} markers (in that order) to put the table between")
    head = text[:start + len(START)]
    tmp = f"{readme}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(head + "\n" + table + "\n" + text[end:])
    os.replace(tmp, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slp_runner.bench.readme_table",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="one `make bench` run: runs/bench-<time>")
    parser.add_argument("--readme", default="README.md", help="the file to update (default: README.md)")
    args = parser.parse_args(argv)
    try:
        table = build_table(args.run_dir)
        rewrite(args.readme, table)
    except (OSError, ValueError) as exc:
        print(f"readme_table: error: {exc}", file=sys.stderr)
        return 1
    rows = sum(line.startswith("| ") for line in table.splitlines()) - 1  # less the header
    print(f"{args.readme}: performance table from {args.run_dir} ({rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
