"""A careless user stage: it prints every credential it can reach into the run's
records (its log, a file of its own, its metrics, its outputs, its error)."""

import os


def _botocore_credentials() -> list[str]:
    import botocore.session

    creds = botocore.session.Session().get_credentials()
    if creds is None:
        return []
    frozen = creds.get_frozen_credentials()
    return [v for v in (frozen.access_key, frozen.secret_key, frozen.token) if v]


def leak_credentials(ctx, prompts=None, fail: bool = False, **params) -> dict:
    found = [os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"),
             *_botocore_credentials(), *(str(v) for v in params.values()),
             *(str(v) for v in (getattr(ctx.store.fs, "storage_options", None) or {}).values())]
    text = " ".join(v for v in found if v)
    ctx.log.info("debugging the connection: %s", text)
    with open(os.path.join(ctx.stage_dir, "debug.txt"), "w") as f:
        f.write(f"credentials: {text}\n")
    ctx.metrics["debug"] = text
    if fail:
        raise RuntimeError(f"could not connect with {text}")
    return {"debug": text}
