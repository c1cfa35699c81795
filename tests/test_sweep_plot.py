"""The sweep's throughput plot stays readable with many series: a panel per backend,
the legend outside every panel, enough y ticks, p5-p95 bars; and without matplotlib
the summary is still written. The rows come from result.json files shaped exactly
like a real job's: metrics built by the benchmark's own Series."""

import os
import subprocess
import sys

import pytest

from slp_runner.bench.storage import MiB, Series
from slp_runner.bench.sweep import build_figure, collect, write_job_result, write_summary

import matplotlib  # noqa: E402  (the dev extra installs it: a missing one must fail, not skip)

SPEED = {"local": 900.0, "seaweedfs": 250.0, "s3": 150.0}  # MiB/s
REFERENCE = {"local": "plain copy", "seaweedfs": "curl (single stream)", "s3": "boto3"}
OPS = ("upload", "download", "roundtrip")


def fake_sweep(sweep_dir, backends=tuple(SPEED), ops=OPS, sizes=(1, 16, 256)) -> None:
    """One job folder per (backend, op, size), its result.json as a real job writes it."""
    job = 0
    for backend in backends:
        for op in ops:
            for size in sizes:
                speed = SPEED.get(backend, 120.0)
                ours, ref = Series(f"slp {backend}", size * MiB), Series(REFERENCE.get(backend, "boto3"), size * MiB)
                for k in range(5):  # latencies spread around size / speed
                    ours.seconds.append(size / speed * (0.9 + 0.1 * k))
                    ref.seconds.append(size / speed * (0.8 + 0.05 * k))
                metrics = {"op": op, "backend": backend, "size_mb": size, "size_bytes": size * MiB, "iterations": 5,
                           "warmup": 0, "slp": ours.summary(), "reference": ref.summary(), "ratio_to_reference": 1.0,
                           "peak_rss_mib": 50.0}
                write_job_result(str(sweep_dir / str(job)), {
                    "status": "completed", "run_id": f"run-{job}", "folder": "x",
                    "overrides": [f"backend={backend}", f"bench.op={op}", f"bench.size_mb={size}"],
                    "stages": {"bench": {"status": "completed", "metrics": metrics}}})
                job += 1


def test_eighteen_series_a_panel_per_backend_legend_outside(tmp_path):
    fake_sweep(tmp_path)  # 3 backends x 3 ops x (slp, reference) = 18 series
    rows = write_summary(str(tmp_path))
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = build_figure(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()

    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == ["local", "s3", "seaweedfs"]
    assert "curl (single stream)" in fig.axes[2].get_title()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [f"{op}: {who}" for op in sorted(OPS)
                                                          for who in ("slp", "reference")]
    box = legend.get_window_extent(renderer)
    assert 0 <= box.x0 and box.x1 <= fig.bbox.x1 and 0 <= box.y0 and box.y1 <= fig.bbox.y1  # not cut off
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()
        lo, hi = ax.get_ylim()
        ticks = [(t.get_loc(), t.label1.get_text()) for t in ax.yaxis.get_major_ticks()]
        assert len([1 for loc, text in ticks if lo <= loc <= hi and text]) >= 4, ticks
        assert ax.get_xscale() == "log"  # 1..256 MiB spans over two decades
        bars = [c for c in ax.containers if c.has_yerr]
        assert len(bars) == 6 and all(len(c.lines[2][0].get_segments()) == 3 for c in bars)

    # a bar spans the throughput at p95 latency to that at p5 latency
    row = next(r for r in rows if (r["backend"], r["op"], r["size_mb"]) == ("seaweedfs", "upload", 16))
    bar = next(c for c in fig.axes[2].containers if c.get_label() == "upload: slp")
    (_, low), (_, high) = bar.lines[2][0].get_segments()[1]
    assert low == pytest.approx(16 * 1000 / row["slp_p95_ms"]) and high == pytest.approx(16 * 1000 / row["slp_p5_ms"])
    assert low < row["slp_mib_s"] < high


def test_figure_grows_with_panels_and_stays_linear_within_a_decade(tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    fake_sweep(one, backends=("local",), sizes=(1, 2))
    fake_sweep(four, backends=("local", "seaweedfs", "s3", "s3-eu"), ops=("upload",), sizes=(1, 2))
    small, big = build_figure(collect(str(one))), build_figure(collect(str(four)))
    assert len(small.axes) == 1 and len(big.axes) == 4  # 3 + 1 panels: no empty sixth axes left
    (w1, h1), (w4, h4) = small.get_size_inches(), big.get_size_inches()
    assert w4 > w1 and h4 > h1  # a second row of panels
    assert small.axes[0].get_xscale() == "linear"
    assert [t.get_text() for t in small.axes[0].get_xticklabels()] == ["1", "2"]


def test_summary_without_matplotlib(tmp_path):
    """The bench extra missing: the tables are written, the plot is skipped with a note."""
    fake_sweep(tmp_path, backends=("local",), ops=("upload",), sizes=(1,))
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # import matplotlib now raises ImportError
            "from slp_runner.bench.sweep import write_summary\n"
            f"print(len(write_summary({str(tmp_path)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "throughput plot skipped" in proc.stdout and proc.stdout.strip().endswith("1")
    assert os.path.exists(tmp_path / "summary.csv") and not os.path.exists(tmp_path / "throughput.png")
