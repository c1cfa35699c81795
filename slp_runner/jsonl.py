"""Validation of JSONL prompt batches: one JSON object per line, each with a prompt."""

from __future__ import annotations

import orjson

from .errors import BadJSONL


def count_prompt_records(path: str, require_prompt: bool = True) -> int:
    """Return the number of records; raise BadJSONL naming the first bad line.

    Blank lines are allowed (editors leave them); every other line must be a JSON
    object, and with ``require_prompt`` carry a string ``prompt``.
    """
    count = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise BadJSONL(f"{path}:{lineno}: invalid JSON ({exc.args[0].split(':')[0]})") from None
            if not isinstance(record, dict):
                raise BadJSONL(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if require_prompt and not isinstance(record.get("prompt"), str):
                raise BadJSONL(f"{path}:{lineno}: missing string field 'prompt'")
            count += 1
    if count == 0 and require_prompt:
        raise BadJSONL(f"{path}: no prompt records")
    return count
