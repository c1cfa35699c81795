"""Hydra multirun sweeps: each job leaves ``result.json`` in its job folder; at the
end the :class:`SweepSummary` callback gathers them into ``summary.csv``,
``summary.md`` and ``throughput.png`` beside the jobs. The :class:`ScrubSweep`
callback keeps secrets out of all of it, and out of Hydra's own ``multirun.yaml``.

A sweep interrupted part-way is resumed by running the same command again with
``hydra.sweep.dir=<its folder> resume=true``: Hydra numbers the jobs the same way,
and a job whose folder already holds a completed result is not run again.
"""

from __future__ import annotations

import csv
import functools
import glob
import math
import os
import sys
from typing import Any

import orjson
from hydra.experimental.callback import Callback

from ..redaction import Redactor

RESULT = "result.json"
MULTIRUN_YAML = "multirun.yaml"  # what Hydra's basic sweeper saves in the sweep folder
COLUMNS = ["backend", "op", "size_mb", "status", "slp_mib_s", "slp_p5_ms", "slp_p50_ms", "slp_p95_ms", "slp_p99_ms",
           "slp_stdev_ms", "success_rate", "errors", "reference", "reference_mib_s", "reference_p5_ms",
           "reference_p50_ms", "reference_p95_ms", "ratio", "time_ratio", "floor", "floor_p50_ms", "own_process_p50_ms",
           "peak_rss_mib", "run_id", "job", "overrides", "error"]
# Row columns a job's parameters fill when it left no metrics (it failed): column -> config key.
PARAMS = {"backend": "backend", "op": "bench.op", "size_mb": "bench.size_mb"}
MD_ERROR_CHARS = 200  # summary.md is printed on the console; summary.csv keeps the whole error


def write_job_result(job_dir: str, result: dict[str, Any], redactor: Redactor | None = None) -> None:
    """Write a job's ``result.json``, its overrides and error scrubbed of secrets by
    ``redactor`` (default: this process's environment's)."""
    redactor = redactor or Redactor()
    if "overrides" in result:
        result = {**result, "overrides": redactor.overrides(result["overrides"])}
    os.makedirs(job_dir, exist_ok=True)
    tmp = os.path.join(job_dir, f".{RESULT}.tmp")
    with open(tmp, "wb") as f:
        f.write(redactor.bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2, default=str)))
    os.replace(tmp, os.path.join(job_dir, RESULT))


def completed_result(job_dir: str) -> dict | None:
    try:
        with open(os.path.join(job_dir, RESULT), "rb") as f:
            result = orjson.loads(f.read())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return result if result.get("status") == "completed" else None


@functools.cache
def _overrides_parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def parse_override(override: str) -> tuple[str, Any] | None:
    """``bench.size_mb=256`` -> ``("bench.size_mb", 256)``; ``+x=1`` and ``++x=1`` alike;
    None for a deletion (``~x``). Values typed as Hydra types them."""
    try:
        (parsed,) = _overrides_parser().parse_overrides([override])
    except Exception:  # not Hydra's grammar (cannot happen for a job's own overrides): keep the text
        key, sep, value = override.partition("=")
        return (key.lstrip("+~").split("@", 1)[0], value) if sep and not key.startswith("~") else None
    return None if parsed.is_delete() else (parsed.key_or_group, parsed.value())


def _key(override: str) -> str | None:
    parsed = parse_override(override)
    return parsed[0] if parsed else None


def sweep_defaults(config) -> dict[str, Any]:
    """What a job runs with when it does not override :data:`PARAMS`: the sweep's
    backend choice and bench settings (Hydra leaves the swept overrides out of the
    sweep's own config, and saves no per-job config). The bench settings only when
    the pipeline benchmarks: another pipeline's jobs never ran an op or a size."""
    from omegaconf import OmegaConf

    def get(path: str) -> Any:
        return OmegaConf.select(config, path, default=None, throw_on_resolution_failure=False)

    stages = get("pipeline.stages") or {}
    benches = any(str(s.get("_target_", "")).endswith(".bench_storage") for s in stages.values() if s)
    return {"backend": get("hydra.runtime.choices.backend"),
            **({"bench.op": get("bench.op"), "bench.size_mb": get("bench.size_mb")} if benches else {})}


def _job_error(result: dict) -> str:
    """Why a job failed: the task's own error, else each failed stage's."""
    if result.get("error"):
        return str(result["error"])
    return "; ".join(f"{name}: {stage['error']}" for name, stage in (result.get("stages") or {}).items()
                     if stage.get("error"))


def _row(job: str, result: dict, defaults: dict[str, Any] | None = None) -> list[dict]:
    overrides = [str(o) for o in result.get("overrides") or []]
    common = {"status": result.get("status"), "run_id": result.get("run_id"), "job": job, "overrides": overrides,
              "error": _job_error(result)}
    rows = []
    for stage in (result.get("stages") or {}).values():
        m = stage.get("metrics") or {}
        if "op" not in m or "slp" not in m:
            continue
        s, ref, floor = m["slp"], m.get("reference") or {}, m.get("floor") or {}
        lat, ref_lat = s.get("latency_ms") or {}, ref.get("latency_ms") or {}
        rows.append({
            **common, "backend": m.get("backend"), "op": m.get("op"), "size_mb": m.get("size_mb"),
            "slp_mib_s": s.get("throughput_mib_s"), "slp_p5_ms": lat.get("p5"), "slp_p50_ms": lat.get("p50"),
            "slp_p95_ms": lat.get("p95"), "slp_p99_ms": lat.get("p99"), "slp_stdev_ms": lat.get("stdev"),
            "success_rate": s.get("success_rate"),
            "errors": ";".join(f"{k}={v}" for k, v in (s.get("errors") or {}).items()),
            "reference": ref.get("tool"), "reference_mib_s": ref.get("throughput_mib_s"),
            "reference_p5_ms": ref_lat.get("p5"), "reference_p50_ms": ref_lat.get("p50"),
            "reference_p95_ms": ref_lat.get("p95"), "ratio": m.get("ratio_to_reference"),
            "time_ratio": m.get("time_ratio_to_reference"), "floor": floor.get("tool"),
            "floor_p50_ms": (floor.get("latency_ms") or {}).get("p50"), "peak_rss_mib": m.get("peak_rss_mib"),
            "own_process_p50_ms": ((m.get("own_process") or {}).get("latency_ms") or {}).get("p50"),
        })
    if not rows:  # no metrics (the job failed): its parameters are what it was asked to run
        given = {**(defaults or {}), **dict(filter(None, map(parse_override, overrides)))}
        rows.append({**common, **{col: given.get(key) for col, key in PARAMS.items()}})
    return rows


def collect(sweep_dir: str, defaults: dict[str, Any] | None = None) -> list[dict]:
    """Every job's rows, in job order; ``defaults``: see :func:`sweep_defaults`."""
    rows = []
    for path in sorted(glob.glob(os.path.join(sweep_dir, "*", RESULT)),
                       key=lambda p: int(os.path.basename(os.path.dirname(p))) if
                       os.path.basename(os.path.dirname(p)).isdigit() else 0):
        with open(path, "rb") as f:
            rows += _row(os.path.basename(os.path.dirname(path)), orjson.loads(f.read()), defaults)
    return rows


def _fmt(v) -> str:
    if v is None or v == "" or v == []:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}"
    if isinstance(v, list):
        v = " ".join(map(str, v))
    return str(v).replace("\n", " ").replace("|", "\\|")  # one table cell


def _size(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return 0.0


def write_summary(sweep_dir: str, defaults: dict[str, Any] | None = None) -> list[dict]:
    """summary.csv, summary.md and throughput.png from every job's result."""
    rows = collect(sweep_dir, defaults)
    if not rows:
        return rows
    with open(os.path.join(sweep_dir, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: " ".join(r[k]) if k == "overrides" else r.get(k) for k in COLUMNS})
    # The table shows what tells the jobs apart: overrides shared by all of them, or
    # already in a column of their own, are left out of its overrides cell.
    shared = set.intersection(*(set(r["overrides"]) for r in rows))

    def cell(r: dict, k: str) -> str:
        if k == "overrides":
            return _fmt([o for o in r[k] if o not in shared and _key(o) not in PARAMS.values()])
        text = _fmt(r.get(k))
        return text[:MD_ERROR_CHARS] + "..." if k == "error" and len(text) > MD_ERROR_CHARS else text

    processes = [r for r in rows if str(r.get("op")).startswith("cli_")]
    floors = sorted({str(r["floor"]) for r in processes if r.get("floor")})
    shown = ["backend", "op", "size_mb", "slp_mib_s", "reference", "reference_mib_s", "ratio", "slp_p50_ms",
             "slp_p95_ms", "slp_p99_ms", "reference_p50_ms", *(["floor_p50_ms"] if floors else []),
             *(["own_process_p50_ms"] if any(r.get("own_process_p50_ms") for r in processes) else []), "success_rate",
             "peak_rss_mib", "status", "overrides", "error"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in sorted(rows, key=lambda r: (str(r.get("backend")), str(r.get("op")), _size(r.get("size_mb")))):
        lines.append("| " + " | ".join(cell(r, k) for k in shown) + " |")
    lines += ["", "MiB/s = size / mean latency. Percentiles: linear interpolation between closest ranks. "
              "ratio = slp / reference (for op=cache: warm get over cold get)."]
    if processes:
        lines.append("cli_* ops: whole slp processes beside a reference process; ratio = reference p50 / slp p50 "
                     "(above 1: slp faster), slp through its resident server; own_process_p50_ms = slp in its own process "
                     "(SLP_SERVER=off, a first command); peak_rss_mib = the slp process's or its server worker's"
                     + (f"; floor_p50_ms: {', '.join(floors)}." if floors else "."))
    if len(processes) < len(rows):
        lines.append("In-process ops: peak_rss_mib = this job's process while slp's steps ran; it holds Hydra and, "
                     "on S3, the reference's boto3 too (result.json: peak_rss_growth_mib, what slp's step added; "
                     "benchmarks.store_throughput measures a put or get in a process of its own).")
    lines += ["overrides: the job's own, besides backend, bench.op, bench.size_mb and those every job shares"
              + (f" ({' '.join(sorted(shared))})." if shared else "."),
              "error: why a failed job failed (whole in summary.csv)."]
    with open(os.path.join(sweep_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(rows, os.path.join(sweep_dir, "throughput.png"))
    return rows


# Left out of the plot: a warm get (a stat) is orders of magnitude off every transfer,
# and a cache hit or listing as a process is start-up time, not a transfer.
NOT_PLOTTED = ("cache", "cli_hit", "cli_ls")


def _plotted(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("slp_mib_s") and r.get("op") not in NOT_PLOTTED]


def _plot(rows: list[dict], path: str):
    """Save :func:`build_figure` as ``path``; return the figure (None: nothing to plot)."""
    if not _plotted(rows):
        return None
    try:
        import matplotlib  # noqa: F401  (the bench extra)
    except ImportError:
        print("throughput plot skipped: it needs the bench extra (pip install 'slp-runner[bench]')")
        return None
    fig = build_figure(rows)
    fig.savefig(path, dpi=110)
    return fig


def _bars(rows: list[dict], who: str) -> tuple[list, list, list]:
    """x, y and the [below, above] error of each point of ``who`` (slp | reference):
    throughput at p95 latency up to throughput at p5 latency (none where unknown)."""
    xs, ys, err = [], [], [[], []]
    for r in rows:
        y, size = r.get(f"{who}_mib_s"), _size(r.get("size_mb"))
        if not y:
            continue
        p5, p95 = r.get(f"{who}_p5_ms"), r.get(f"{who}_p95_ms")
        # the mean latency may lie outside p5..p95 (an outlier): no negative bar then
        err[0].append(max(y - size * 1000 / p95, 0) if p95 else 0)
        err[1].append(max(size * 1000 / p5 - y, 0) if p5 else 0)
        xs.append(size)
        ys.append(y)
    return xs, ys, err


def build_figure(rows: list[dict]):
    """Throughput against size, a panel per backend: a colour per op, slp solid with
    dots, its reference tool dashed with crosses, bars from p5 to p95 latency; the
    legend right of the panels. None when no row has a throughput."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, NullLocator

    plotted = _plotted(rows)
    if not plotted:
        return None
    backends = sorted({str(r["backend"]) for r in plotted})
    ops = sorted({str(r["op"]) for r in plotted})
    sizes = sorted({_size(r["size_mb"]) for r in plotted})
    ncols = min(3, len(backends))
    nrows = math.ceil(len(backends) / ncols)
    # a fixed size per panel, plus room on the right for the legend
    fig = Figure(figsize=(3.8 * ncols + 2.0, 3.0 * nrows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)  # so that callers can draw it and measure what was drawn
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
    for ax in axes[len(backends):]:
        ax.remove()
    styles = {"slp": {"linestyle": "-", "marker": "o"},
              "reference": {"linestyle": "--", "marker": "x"}}
    for ax, backend in zip(axes, backends):
        mine = sorted((r for r in plotted if str(r["backend"]) == backend), key=lambda r: _size(r["size_mb"]))
        for i, op in enumerate(ops):
            for j, (who, style) in enumerate(styles.items()):
                xs, ys, err = _bars([r for r in mine if str(r["op"]) == op], who)
                if xs:
                    # each series a little aside of the true size, so that its bars do not hide the others'
                    dodge = 1 + 0.03 * (2 * i + j - len(ops) + 0.5)
                    ax.errorbar([x * dodge for x in xs], ys, yerr=err, color=f"C{i}", capsize=3, markersize=5,
                                linewidth=1.5, label=f"{op}: {who}", **style)
        tools = sorted({str(r["reference"]) for r in mine if r.get("reference_mib_s")})
        ax.set_title(f"{backend}\nreference: {', '.join(tools) or 'none'}", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, min_n_ticks=4))
        ax.grid(True, alpha=0.3)
        ax.tick_params(axis="x", labelbottom=True)  # every panel names its sizes
    ax0 = axes[0]
    if sizes[-1] > 10 * sizes[0] > 0:  # sizes over more than a decade: log, else the small ones bunch up
        ax0.set_xscale("log")
    ax0.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax0.xaxis.set_minor_locator(NullLocator())
    fig.supxlabel("size (MiB)")
    fig.supylabel("throughput (MiB/s)")
    fig.suptitle("slp-runner storage throughput (solid) vs reference tool (dashed); bars: p5-p95 latency")
    found = {}  # one legend for all panels: each label once
    for ax in axes[:len(backends)]:
        handles, labels = ax.get_legend_handles_labels()
        found.update(zip(labels, handles))
    order = [f"{op}: {who}" for op in ops for who in styles if f"{op}: {who}" in found]
    fig.legend([found[k] for k in order], order, loc="outside right upper", fontsize=8)
    return fig


class SweepSummary(Callback):
    """Hydra callback: name each job's overrides as it starts; write the sweep
    summary when the multirun ends."""

    def on_job_start(self, config, **kwargs) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        # Hydra's own "#3 : ..." line is gone with its logging; secrets masked as everywhere
        overrides = _redactor(config).overrides(str(o) for o in config.hydra.overrides.task)
        print(f"[job {config.hydra.job.num}] {' '.join(overrides)}", flush=True)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = config.hydra.sweep.dir
        rows = write_summary(sweep_dir, sweep_defaults(config))
        if rows:
            with open(os.path.join(sweep_dir, "summary.md")) as f:
                print(f.read())
            plot = ", throughput.png" if os.path.exists(os.path.join(sweep_dir, "throughput.png")) else ""
            print(f"sweep summary: {sweep_dir}/summary.md, summary.csv{plot} ({len(rows)} rows)")
        failed = [r for r in rows if r.get("status") != "completed"]
        if failed:
            sys.stdout.flush()
            print(f"slp: error: {len(failed)} of {len(rows)} sweep jobs failed; resume with "
                  f"hydra.sweep.dir={sweep_dir} resume=true", file=sys.stderr)
            raise SystemExit(1)


class ScrubSweep(Callback):
    """Hydra callback: keep secrets out of what Hydra itself writes in the sweep folder.

    Hydra's basic sweeper saves the whole multirun config as ``multirun.yaml`` before
    the first job starts, command-line secrets included, and no setting turns that
    off; so each job masks it as it starts (before any slow work), and the sweep's end
    scrubs every file of the folder once more.
    """

    def on_job_start(self, config, **kwargs) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:  # a single run: Hydra wrote nothing
            return
        _scrub_hydra_yaml(os.path.join(config.hydra.sweep.dir, MULTIRUN_YAML), _redactor(config))

    def on_multirun_end(self, config, **kwargs) -> None:
        redactor = _redactor(config)
        _scrub_hydra_yaml(os.path.join(config.hydra.sweep.dir, MULTIRUN_YAML), redactor)
        redactor.scrub_folder(config.hydra.sweep.dir)


def _redactor(config) -> Redactor:
    from ..pipeline.from_config import redactor

    return redactor(config)


def _scrub_hydra_yaml(path: str, redactor: Redactor) -> None:
    """Mask a saved Hydra config by key name and by value, its override lists too."""
    import yaml

    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except FileNotFoundError:
        return
    if not isinstance(tree, dict):
        return
    clean = redactor.tree(tree)
    hydra = clean.get("hydra") or {}
    for name, values in (hydra.get("overrides") or {}).items():
        if isinstance(values, list):
            hydra["overrides"][name] = redactor.overrides(str(v) for v in values)
    job = hydra.get("job") or {}
    if isinstance(job.get("override_dirname"), str):  # the task overrides again, joined by ","
        job["override_dirname"] = ",".join(redactor.overrides(job["override_dirname"].split(",")))
    if clean == tree:
        return
    tmp = f"{path}.{os.getpid()}.tmp"  # jobs of a parallel launcher may rewrite it at once
    with open(tmp, "w") as f:
        yaml.safe_dump(clean, f, sort_keys=False)
    os.replace(tmp, path)
