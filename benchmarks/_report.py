"""Where benchmark scripts leave their results: ``runs/bench-<name>-<time>/``."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import orjson


def out_dir(name: str) -> str:
    path = os.path.join("runs", f"bench-{name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    os.makedirs(path, exist_ok=True)
    return path


def publish(folder: str, lines: list[str], results: dict | None = None) -> None:
    """Write summary.md (and results.json), print the summary and where it is."""
    summary = "\n".join(lines) + "\n"
    if results is not None:
        with open(os.path.join(folder, "results.json"), "wb") as f:
            f.write(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(summary)
    print(summary)
    print(f"results in {folder}")
