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
import glob
import os
from typing import Any

import orjson
from hydra.experimental.callback import Callback

from ..redaction import Redactor

RESULT = "result.json"
MULTIRUN_YAML = "multirun.yaml"  # what Hydra's basic sweeper saves in the sweep folder
COLUMNS = ["backend", "op", "size_mb", "status", "slp_mib_s", "slp_p50_ms", "slp_p95_ms", "slp_p99_ms",
           "slp_stdev_ms", "success_rate", "errors", "reference", "reference_mib_s", "ratio", "peak_rss_mib",
           "run_id", "job"]


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


def _row(job: str, result: dict) -> list[dict]:
    rows = []
    for stage in (result.get("stages") or {}).values():
        m = stage.get("metrics") or {}
        if "op" not in m or "slp" not in m:
            continue
        s, ref = m["slp"], m.get("reference") or {}
        lat = s.get("latency_ms") or {}
        rows.append({
            "backend": m.get("backend"), "op": m.get("op"), "size_mb": m.get("size_mb"),
            "status": result.get("status"), "slp_mib_s": s.get("throughput_mib_s"),
            "slp_p50_ms": lat.get("p50"), "slp_p95_ms": lat.get("p95"), "slp_p99_ms": lat.get("p99"),
            "slp_stdev_ms": lat.get("stdev"), "success_rate": s.get("success_rate"),
            "errors": ";".join(f"{k}={v}" for k, v in (s.get("errors") or {}).items()),
            "reference": ref.get("tool"), "reference_mib_s": ref.get("throughput_mib_s"),
            "ratio": m.get("ratio_to_reference"), "peak_rss_mib": m.get("peak_rss_mib"),
            "run_id": result.get("run_id"), "job": job,
        })
    if not rows:
        rows.append({"status": result.get("status"), "run_id": result.get("run_id"), "job": job,
                     "errors": result.get("error", "")})
    return rows


def collect(sweep_dir: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(sweep_dir, "*", RESULT)),
                       key=lambda p: int(os.path.basename(os.path.dirname(p))) if
                       os.path.basename(os.path.dirname(p)).isdigit() else 0):
        with open(path, "rb") as f:
            rows += _row(os.path.basename(os.path.dirname(path)), orjson.loads(f.read()))
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}"
    return str(v)


def write_summary(sweep_dir: str) -> list[dict]:
    """summary.csv, summary.md and throughput.png from every job's result."""
    rows = collect(sweep_dir)
    if not rows:
        return rows
    with open(os.path.join(sweep_dir, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})
    shown = ["backend", "op", "size_mb", "slp_mib_s", "reference", "reference_mib_s", "ratio", "slp_p50_ms",
             "slp_p95_ms", "slp_p99_ms", "success_rate", "peak_rss_mib", "status"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in sorted(rows, key=lambda r: (str(r.get("backend")), str(r.get("op")), r.get("size_mb") or 0)):
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in shown) + " |")
    lines += ["", "MiB/s = size / mean latency. Percentiles: linear interpolation between closest ranks. "
              "ratio = slp / reference (for op=cache: warm get over cold get)."]
    with open(os.path.join(sweep_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(rows, os.path.join(sweep_dir, "throughput.png"))
    return rows


def _plot(rows: list[dict], path: str) -> None:
    series: dict[tuple, list] = {}
    for r in rows:
        if r.get("slp_mib_s") and r.get("op") != "cache":
            series.setdefault((r["backend"], r["op"]), []).append(r)
    if not series:
        return
    try:
        import matplotlib
    except ImportError:
        print("throughput plot skipped: it needs the bench extra (pip install 'slp-runner[bench]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for (backend, op), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["size_mb"])
        line, = ax.plot([r["size_mb"] for r in rs], [r["slp_mib_s"] for r in rs], marker="o",
                        label=f"slp {backend} {op}")
        refs = [r for r in rs if r.get("reference_mib_s")]
        if refs:
            ax.plot([r["size_mb"] for r in refs], [r["reference_mib_s"] for r in refs], linestyle="--",
                    marker="x", color=line.get_color(), label=f"{refs[0]['reference']} ({backend} {op})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    sizes = sorted({r["size_mb"] for rs in series.values() for r in rs})
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("size (MiB)")
    ax.set_ylabel("throughput (MiB/s)")
    ax.set_title("slp-runner storage throughput (solid) vs reference tools (dashed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class SweepSummary(Callback):
    """Hydra callback: write the sweep summary when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = config.hydra.sweep.dir
        rows = write_summary(sweep_dir)
        if rows:
            with open(os.path.join(sweep_dir, "summary.md")) as f:
                print(f.read())
            print(f"sweep summary: {sweep_dir}/summary.md, summary.csv, throughput.png ({len(rows)} rows)")
        failed = [r for r in rows if r.get("status") != "completed"]
        if failed:
            print(f"slp: error: {len(failed)} of {len(rows)} sweep jobs failed; resume with "
                  f"hydra.sweep.dir={sweep_dir} resume=true")
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
