"""A user's own stages: plain functions, referenced from pipeline YAML by `_target_`."""


def count_words(ctx, text: str) -> dict:
    ctx.metrics["words"] = len(text.split())
    return {"count": len(text.split())}


def double(ctx, value: int) -> dict:
    return {"value": 2 * value}
