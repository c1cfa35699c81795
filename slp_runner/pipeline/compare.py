"""``slp task=compare run=A other=B``: how two runs differ. Their saved configs key by
key, their metrics side by side, and which output artifacts have the same hash.

Each run is read from its local folder, else from the backend's copy (as
:func:`.history.load_run_file` does), so runs made on other machines compare too.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import orjson
import yaml

from ..errors import ArtifactNotFound
from ..store import ArtifactStore
from .history import load_run_file, recorded_overrides

RUN = "(run)"  # the pseudo-stage of run-wide numbers (total_latency_ms)
IGNORED_CONFIG = ("hydra",)  # Hydra's own node, if a config ever holds it: not the run's settings


def _load(run_id: str, runs_dir: str, store: ArtifactStore | None) -> dict:
    manifest = orjson.loads(load_run_file(run_id, "manifest.json", runs_dir, store))  # unknown run: raises here
    config, overrides = {}, []
    try:  # a finalized abandoned run always has both; an odd folder may lack one
        config = yaml.safe_load(load_run_file(run_id, "config.yaml", runs_dir, store)) or {}
    except ArtifactNotFound:
        pass
    try:
        overrides = orjson.loads(load_run_file(run_id, "overrides.yaml", runs_dir, store))
    except ArtifactNotFound:
        overrides = manifest.get("overrides") or []
    return {"manifest": manifest, "config": config if isinstance(config, dict) else {}, "overrides": overrides}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"infer": {"max_tokens": 64}}`` -> ``{"infer.max_tokens": 64}``; lists and
    empty mappings are leaves."""
    if not isinstance(tree, dict) or (not tree and prefix):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _union(a: dict, b: dict) -> list:
    """Keys of ``a`` in its order, then those only ``b`` has."""
    return list(a) + [k for k in b if k not in a]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _stage_numbers(stage: dict | None) -> dict[str, float]:
    """A stage's numbers: those of its manifest record (latency_ms), then the numeric
    leaves of its metrics; a metric named like a record field is kept as ``metrics.<name>``."""
    stage = stage or {}
    out = {k: v for k, v in stage.items() if _number(v)}
    for name, value in _flatten(stage.get("metrics") or {}).items():
        if _number(value):
            out[f"metrics.{name}" if name in out else name] = value
    return out


def _config_diff(a: dict, b: dict) -> list[dict]:
    fa, fb = ({k: v for k, v in _flatten(c).items() if k.split(".")[0] not in IGNORED_CONFIG} for c in (a, b))
    return [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in _union(fa, fb) if fa.get(k) != fb.get(k)]


def _metrics(ma: dict, mb: dict) -> list[dict]:
    sa, sb = ma.get("stages") or {}, mb.get("stages") or {}
    per_stage = {RUN: ({"total_latency_ms": ma.get("total_latency_ms")}, {"total_latency_ms": mb.get("total_latency_ms")})}
    per_stage.update({s: (sa.get(s), sb.get(s)) for s in _union(sa, sb)})
    rows = []
    for stage, (a, b) in per_stage.items():
        na, nb = _stage_numbers(a), _stage_numbers(b)
        for metric in _union(na, nb):
            x, y = na.get(metric), nb.get(metric)
            rows.append({"stage": stage, "metric": metric, "a": x, "b": y,
                         "ratio": y / x if x is not None and y is not None and x != 0 else None})
    return rows


def _artifacts(ma: dict, mb: dict) -> list[dict]:
    aa, ab = ma.get("artifacts") or {}, mb.get("artifacts") or {}
    rows = []
    for name in _union(aa, ab):
        ha, hb = (aa.get(name) or {}).get("hash"), (ab.get(name) or {}).get("hash")
        kind = (aa.get(name) or ab.get(name) or {}).get("kind")
        rows.append({"name": name, "kind": kind, "a": ha, "b": hb, "same": ha is not None and ha == hb})
    return rows


def compare(run_a: str, run_b: str, runs_dir: str, store: ArtifactStore | None = None) -> dict:
    """Differences between two runs (the same run twice is fine: none)."""
    a, b = _load(run_a, runs_dir, store), _load(run_b, runs_dir, store)
    ma, mb = a["manifest"], b["manifest"]

    def both(field: str) -> dict:
        return {"a": ma.get(field), "b": mb.get(field)}

    return {
        "a": run_a, "b": run_b,
        "status": both("status"), "pipeline": both("pipeline"), "start_time": both("start_time"),
        "reproduces": both("reproduces"),
        "overrides": {"a": recorded_overrides(a["overrides"]), "b": recorded_overrides(b["overrides"])},
        "config": _config_diff(a["config"], b["config"]),
        "metrics": _metrics(ma, mb),
        "artifacts": _artifacts(ma, mb),
    }


def _text(value: Any, width: int = 60) -> str:
    """A value for a table cell: missing as ``-``, numbers compact, long ones cut."""
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, str):
        text = value
    else:
        text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= width else text[:width - 3] + "..."


def _table(rows: list[list[str]], out: TextIO, right: tuple[int, ...] = ()) -> None:
    """Rows as columns, two spaces apart; the columns in ``right`` right-aligned (numbers)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  " + "  ".join(cells).rstrip(), file=out)


def print_comparison(result: dict, out: TextIO = sys.stdout) -> None:
    """Side by side: the two runs, config differences, metrics with B/A, artifacts."""
    for side in ("a", "b"):
        extra = f"  reproduces {result['reproduces'][side]}" if result["reproduces"][side] else ""
        print(f"{side.upper()}: {result[side]}  {result['status'][side] or '-'}  {result['pipeline'][side] or '-'}  "
              f"{result['start_time'][side] or '-'}{extra}", file=out)
        print(f"   overrides: {' '.join(result['overrides'][side]) or '(none)'}", file=out)
    if result["config"]:
        print(f"\nconfig differences ({len(result['config'])}):", file=out)
        _table([["key", "A", "B"]] + [[d["key"], _text(d["a"]), _text(d["b"])] for d in result["config"]], out)
    else:
        print("\nconfig: identical", file=out)
    if result["metrics"]:
        print("\nmetrics:", file=out)
        _table([["stage", "metric", "A", "B", "B/A"]]
               + [[m["stage"], m["metric"], _text(m["a"]), _text(m["b"]),
                   "-" if m["ratio"] is None else f"{m['ratio']:.3g}"] for m in result["metrics"]],
               out, right=(2, 3, 4))
    arts = result["artifacts"]
    if arts:
        same = sum(x["same"] for x in arts)
        print(f"\nartifacts ({same} same, {len(arts) - same} different):", file=out)
        _table([["SAME" if x["same"] else "DIFFERENT", x["name"], x["kind"] or "-",
                 (x["a"] or "missing")[:12], (x["b"] or "missing")[:12]] for x in arts], out)
    else:
        print("\nartifacts: none in either run", file=out)
