"""Inference stages: load a model into llama.cpp, run a prompt batch against it.

``load_model`` starts a managed llama-server on the cached GGUF (or checks an
external one) and hands its URL on; the server lives until the run ends.
``infer`` sends every prompt, a bounded number at a time, and writes two files:

- ``results.jsonl``: the seed's slp_llama_batch rows (timestamp, id, prompt, success,
  elapsed_ms, response, token counts): what happened, timings included;
- ``outputs.jsonl``: only what the model produced (id, prompt, success, response, token
  counts, finish), so that two deterministic runs give byte-identical files: this is
  the artifact ``store_results`` stores and ``reproduce`` compares.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import orjson

from ..engine.client import CompletionClient
from ..engine.llama_server import ManagedLlamaServer
from ..errors import EngineError, InputError
from ..jsonl import count_prompt_records
from ..pipeline.context import LocalFile, StageContext
from ..stats import summarize


def _engine(ctx: StageContext) -> dict[str, Any]:
    engine = ctx.options.get("engine")
    if not engine:
        raise InputError("no engine configured: add engine=managed or engine=external engine.url=...")
    return engine


def load_model(ctx: StageContext, model_path: LocalFile | str | None = None) -> dict:
    """Start llama-server on the model (managed engine) or check an external server; outputs ``url``."""
    engine = _engine(ctx)
    if engine["kind"] == "external":
        client = CompletionClient(engine["url"], engine.get("api", "llama"))
        if not client.healthy():
            raise EngineError(f"external engine at {engine['url']} is not answering")
        ctx.metrics.update(engine="external", model_load_ms=0.0)
        return {"url": engine["url"]}
    path = model_path.path if isinstance(model_path, LocalFile) else model_path
    if not path:
        raise InputError("the managed engine needs a model (this pipeline gives none): "
                         "use engine=external engine.url=http://host:port")
    server = ManagedLlamaServer(
        path, log_path=os.path.join(ctx.stage_dir, "llama-server.log"), binary=engine.get("binary") or None,
        threads=engine["threads"], ctx_size=engine["ctx_size"], n_gpu_layers=engine["n_gpu_layers"],
        parallel=engine["parallel"], startup_timeout=engine["startup_timeout"],
        extra_args=list(engine.get("extra_args") or []),
    )
    ctx.resources.callback(server.stop)
    load_s = server.start()
    ctx.log.info("llama-server %s up in %.2fs (pid %s)", server.url, load_s, server.proc.pid)
    ctx.metrics.update(engine="managed", model_load_ms=round(load_s * 1000, 1), threads=engine["threads"],
                       parallel=engine["parallel"], ctx_size=engine["ctx_size"], n_gpu_layers=engine["n_gpu_layers"])
    return {"url": server.url}


def _read_prompts(path: str) -> list[dict]:
    count_prompt_records(path)  # one clear error naming a bad line, before any request
    records = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                rec = orjson.loads(line)
                rec.setdefault("id", f"line{lineno}")
                records.append(rec)
    return records


def infer(ctx: StageContext, url: str, prompts_path: LocalFile | str, concurrency: int | None = None,
          max_tokens: int = 64, temperature: float = 0.0, seed: int = 42, timeout: float = 120.0,
          stream: bool = True, after: Any = None) -> dict:
    """Run every prompt; a failed prompt is recorded and the rest go on.

    ``after``: any upstream output, only to order this stage after another."""
    engine = _engine(ctx)
    path = prompts_path.path if isinstance(prompts_path, LocalFile) else prompts_path
    prompts = _read_prompts(path)
    client = CompletionClient(url, engine.get("api", "llama"), timeout=timeout, model=engine.get("model"))
    workers = max(1, int(concurrency or engine.get("parallel", 1)))

    def one(rec: dict) -> tuple[dict, Any]:
        started = datetime.now(timezone.utc)
        done = client.complete(str(rec["prompt"]), max_tokens=int(rec.get("max_tokens", max_tokens)),
                               temperature=float(rec.get("temperature", temperature)),
                               seed=int(rec.get("seed", seed)), stream=stream)
        return {"timestamp": started.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}, done

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slp-infer") as pool:
        answers = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0

    results_path = os.path.join(ctx.stage_dir, "results.jsonl")
    outputs_path = os.path.join(ctx.stage_dir, "outputs.jsonl")
    with open(results_path, "wb") as results, open(outputs_path, "wb") as outputs:
        for rec, (meta, c) in zip(prompts, answers):
            common = {"id": rec["id"], "prompt": rec["prompt"], "success": c.ok, "response": c.text,
                      "tokens_predicted": c.tokens_predicted, "tokens_evaluated": c.tokens_evaluated}
            if not c.ok:
                common["error"] = c.error
            results.write(orjson.dumps({**meta, **common, "elapsed_ms": round(c.elapsed_ms, 2),
                                        "ttft_ms": None if c.ttft_ms is None else round(c.ttft_ms, 2)}) + b"\n")
            outputs.write(orjson.dumps({**common, "finish": c.finish}, option=orjson.OPT_SORT_KEYS) + b"\n")

    ok = [c for _, c in answers if c.ok]
    failed = [c for _, c in answers if not c.ok]
    tokens = sum(c.tokens_predicted for c in ok)
    lat = summarize(c.elapsed_ms for c in ok)
    ttft = summarize(c.ttft_ms for c in ok if c.ttft_ms is not None)
    ctx.metrics.update(
        prompts_processed=len(ok), prompts_failed=len(failed), tokens_generated=tokens,
        tokens_per_sec=round(tokens / wall, 2) if wall > 0 else 0.0, inference_wall_ms=round(wall * 1000, 1),
        concurrency=workers,
        latency_ms={k: round(v, 2) for k, v in lat.items() if k != "count"},
        ttft_ms={k: round(v, 2) for k, v in ttft.items() if k != "count"},
        failures=[{"id": rec["id"], "error": c.error} for rec, (_, c) in zip(prompts, answers) if not c.ok][:20],
    )
    if failed and not client.healthy():  # failed prompts and a server that no longer answers: it died
        raise EngineError(f"engine at {url} died or stopped answering during inference "
                          f"({len(failed)} of {len(prompts)} prompts failed)")
    ctx.log.info("%d prompts ok, %d failed, %d tokens, %.1f tokens/s", len(ok), len(failed), tokens,
                 ctx.metrics["tokens_per_sec"])
    return {"results_path": LocalFile(outputs_path), "timings_path": LocalFile(results_path)}
