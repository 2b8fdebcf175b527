"""The native asynchronous streaming client: one OpenAI-compatible request, measured; many, scheduled.

Operations:
  RequestSpec, send(client, url, model, spec)   one request; streamed and measured into a RequestRecord
  Target(url, model, run, ...)                  a run: .session() sends with a progress bar, records kept and
                                                written; .send_all(specs) at a concurrency or a request rate
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx

from kvbm_cli._output import progress
from kvbm_cli.httpclient import async_client
from kvbm_cli.results import REQUESTS_FILE, RequestRecord, write_requests


@dataclass
class RequestSpec:
    """One request: the text (`prompt`, or `messages` for chat), how many tokens to generate, its labels."""

    request_id: str
    endpoint: str  # "chat" | "completions"
    max_tokens: Optional[int]
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, str]]] = None
    expected_input_tokens: Optional[int] = None
    prefix_id: Optional[int] = None
    user_id: Optional[int] = None
    round: Optional[int] = None
    warmup: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Sent:
    """A measured request and the text the server answered."""

    record: RequestRecord
    text: str


SendOne = Callable[..., Awaitable[Sent]]


def _error_text(status: int, raw: bytes) -> str:
    try:
        detail = json.loads(raw)
        detail = detail.get("error", detail) if isinstance(detail, dict) else detail
        detail = detail.get("message", detail) if isinstance(detail, dict) else detail
    except ValueError:
        detail = raw.decode(errors="replace")
    return f"HTTP {status}: {str(detail).strip()[:300]}"


async def send(client: httpx.AsyncClient, url: str, model: str, spec: RequestSpec, *, run: str, workload: str,
               streaming: bool = True, ignore_eos: bool = True) -> Sent:
    """Send one request and measure it. Never raises for server or network errors: they go in `error`."""
    chat = spec.endpoint == "chat"
    body: dict[str, Any] = {"model": model, "stream": streaming}
    if chat:
        body["messages"] = spec.messages if spec.messages is not None else [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if spec.max_tokens is not None:
        body["max_tokens"] = spec.max_tokens
        if ignore_eos:  # vLLM extensions: exactly max_tokens tokens, as genai-perf's deterministic output
            body |= {"min_tokens": spec.max_tokens, "ignore_eos": True}
    if streaming:
        body["stream_options"] = {"include_usage": True}
    body.update(spec.extra)
    start_wall, start = time.time(), time.perf_counter()
    arrivals: list[float] = []  # when each streamed piece of text came
    text_parts: list[str] = []
    usage: dict[str, Any] = {}
    error: Optional[str] = None
    try:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        async with client.stream("POST", url.rstrip("/") + path, json=body, headers=spec.headers or None) as resp:
            if resp.status_code != 200:
                error = _error_text(resp.status_code, await resp.aread())
            elif streaming:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
                        break
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                        if piece:
                            arrivals.append(time.perf_counter())
                            text_parts.append(piece)
            else:
                data = json.loads(await resp.aread())
                usage = data.get("usage") or {}
                choice = (data.get("choices") or [{}])[0]
                text_parts.append((choice.get("message") or {}).get("content") or "" if chat
                                  else choice.get("text") or "")
    except (httpx.HTTPError, OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    e2e = time.perf_counter() - start
    if error is None and streaming and not arrivals:
        error = "no tokens in the response stream"
    ok = error is None
    record = RequestRecord(
        request_id=spec.request_id, run=run, workload=workload, start_s=start_wall,
        ttft_s=arrivals[0] - start if ok and arrivals else None,
        itl_s=[b - a for a, b in zip(arrivals, arrivals[1:])] if ok else [], e2e_s=e2e if ok else None,
        input_tokens=int(usage.get("prompt_tokens") or spec.expected_input_tokens or 0),
        output_tokens=int(usage.get("completion_tokens") or len(arrivals)) if ok else 0, prefix_id=spec.prefix_id,
        user_id=spec.user_id, round=spec.round, warmup=spec.warmup, error=error)
    return Sent(record, "".join(text_parts))


@dataclass
class Target:
    """Where a run's requests go (server, model, run label) and where their records land: `records`, and
    requests.jsonl in `artifact_dir` appended as each request finishes (a dying run keeps its data)."""

    url: str
    model: str
    run: str
    workload: str
    artifact_dir: Path
    timeout_s: float = 600.0
    show_progress: bool = True
    records: list[RequestRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        (self.artifact_dir / REQUESTS_FILE).write_text("")

    @contextlib.asynccontextmanager
    async def session(self, concurrency: int, total: Optional[int] = None) -> AsyncIterator[SendOne]:
        """A client for `concurrency` streams and a progress bar; yields `send_one(spec, url=None, **options) -> Sent`
        (url: one of several comma-separated servers; the first by default), which records the request and advances the bar."""
        async with async_client(concurrency, self.timeout_s) as client:
            with progress("requests", not self.show_progress) as bar:
                task = bar.add_task(f"{self.workload} {self.run}", total=total, note="")
                errors = 0  # counted as they come: a long run must not rescan its records per request

                async def send_one(spec: RequestSpec, url: Optional[str] = None, **options: Any) -> Sent:
                    nonlocal errors
                    sent = await send(client, url or self.url.split(",")[0], self.model, spec, run=self.run,
                                      workload=self.workload, **options)
                    self.records.append(sent.record)
                    write_requests(self.artifact_dir / REQUESTS_FILE, [sent.record], "a")
                    errors += sent.record.error is not None
                    ttft = sent.record.ttft_s
                    bar.update(task, advance=1, note=(f"last TTFT {ttft * 1000:.0f} ms" if ttft is not None else "")
                               + (f"  errors {errors}" if errors else ""))
                    return sent

                yield send_one

    async def send_all(self, specs: Sequence[RequestSpec], concurrency: Optional[int] = 1,
                       request_rate: Optional[float] = None, **options: Any) -> dict[str, int]:
        """Send `specs` in order: at most `concurrency` in flight, or one started every 1/`request_rate` s.
        Warm-up specs (which must come first) all finish before the measured ones start. Returns the prompt
        length each request should have."""
        limit = asyncio.Semaphore(concurrency or len(specs) or 1)
        async with self.session(concurrency or 16, len(specs)) as send_one:
            urls = self.url.split(",")  # several servers: spec i goes to server i mod their number (round robin)

            async def one(i: int) -> None:
                async with limit:
                    await send_one(specs[i], urls[i % len(urls)], **options)

            for warmup in (True, False):
                group = [i for i, s in enumerate(specs) if s.warmup == warmup]
                t0, tasks = time.perf_counter(), []
                for k, i in enumerate(group):
                    if request_rate:  # one started every 1/rate s
                        await asyncio.sleep(max(0.0, t0 + k / request_rate - time.perf_counter()))
                    tasks.append(asyncio.create_task(one(i)))
                await asyncio.gather(*tasks)
        return {s.request_id: s.expected_input_tokens for s in specs}
