"""A completion client for llama-server (native ``/completion``) or any
OpenAI-compatible server (``/v1/completions``), streaming so that the time to
first token is measured."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import orjson
import requests

from ..errors import EngineError

APIS = ("llama", "openai")


@dataclass
class Completion:
    text: str = ""
    tokens_predicted: int = 0
    tokens_evaluated: int = 0
    elapsed_ms: float = 0.0
    ttft_ms: float | None = None
    finish: str | None = None
    error: str | None = None
    timings: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


class CompletionClient:
    def __init__(self, url: str, api: str = "llama", timeout: float = 120.0, model: str | None = None):
        if api not in APIS:
            raise EngineError(f"unknown engine api {api!r} (choose from {', '.join(APIS)})")
        self.url = url.rstrip("/")
        self.api = api
        self.timeout = timeout
        self.model = model
        self.session = requests.Session()

    def healthy(self) -> bool:
        path = "/health" if self.api == "llama" else "/v1/models"
        try:
            return self.session.get(self.url + path, timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def complete(self, prompt: str, *, max_tokens: int, temperature: float = 0.0, seed: int = 42,
                 stream: bool = True) -> Completion:
        """One prompt; failures come back as ``Completion.error``, never raised."""
        t0 = time.perf_counter()
        out = Completion()
        for attempt in (1, 2):
            out = self._attempt(prompt, max_tokens, temperature, seed, stream, t0)
            # llama-server may close a kept-alive connection between requests; a request
            # that never reached it is safe to send again on a fresh connection.
            if out.error != "connection refused or reset before any response" or attempt == 2:
                break
        out.elapsed_ms = (time.perf_counter() - t0) * 1000
        return out

    def _attempt(self, prompt, max_tokens, temperature, seed, stream, t0) -> Completion:
        out = Completion()
        try:
            if self.api == "llama":
                body = {"prompt": prompt, "n_predict": max_tokens, "temperature": temperature, "seed": seed,
                        "stream": stream, "cache_prompt": False}
                path = "/completion"
            else:
                body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
                        "stream": stream, "model": self.model or "default"}
                if stream:
                    body["stream_options"] = {"include_usage": True}
                path = "/v1/completions"
            with self.session.post(self.url + path, data=orjson.dumps(body), stream=stream, timeout=self.timeout,
                                   headers={"Content-Type": "application/json"}) as resp:
                if resp.status_code != 200:
                    out.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                elif stream:
                    self._read_stream(resp, out, t0)
                else:
                    self._read_whole(resp.json(), out)
        except requests.Timeout:
            out.error = f"timed out after {self.timeout:.0f}s"
        except requests.ConnectionError:
            out.error = ("connection refused or reset before any response" if not out.text and out.ttft_ms is None
                         else f"connection to {self.url} lost")
        except requests.RequestException as exc:  # a stream cut short, a bad chunk, ...
            out.error = f"{type(exc).__name__} from {self.url}: {str(exc)[:150]}"
        except (ValueError, KeyError) as exc:
            out.error = f"bad response: {exc}"
        return out

    def _read_stream(self, resp, out: Completion, t0: float) -> None:
        pieces = []
        for raw in resp.iter_lines():
            if not raw or not raw.startswith(b"data:"):
                continue
            payload = raw[5:].strip()
            if payload == b"[DONE]":
                break
            event = orjson.loads(payload)
            if "error" in event:
                out.error = str(event["error"])[:200]
                break
            text = event.get("content") if self.api == "llama" else (
                (event.get("choices") or [{}])[0].get("text", ""))
            if text:
                if out.ttft_ms is None:
                    out.ttft_ms = (time.perf_counter() - t0) * 1000
                pieces.append(text)
            self._read_final_fields(event, out)
        out.text = "".join(pieces)

    def _read_whole(self, body: dict, out: Completion) -> None:
        out.text = body["content"] if self.api == "llama" else body["choices"][0]["text"]
        self._read_final_fields(body, out)

    def _read_final_fields(self, event: dict, out: Completion) -> None:
        if self.api == "llama":
            if event.get("stop"):
                out.tokens_predicted = int(event.get("tokens_predicted", 0))
                out.tokens_evaluated = int(event.get("tokens_evaluated", 0))
                out.finish = event.get("stop_type")
                out.timings = event.get("timings") or {}
        else:
            usage = event.get("usage") or {}
            if usage:
                out.tokens_predicted = int(usage.get("completion_tokens", 0))
                out.tokens_evaluated = int(usage.get("prompt_tokens", 0))
            choice = (event.get("choices") or [{}])[0]
            if choice.get("finish_reason"):
                out.finish = choice["finish_reason"]
