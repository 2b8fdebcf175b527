"""`kvbm bench soak`: serving under churn, for as long as you like, against any OpenAI-compatible server.

Concurrent streaming clients send greedy completions over a few shared prefixes (so KVBM offloads, evicts and
onboards them); a share disconnect at a random moment, as client timeouts do, some while their prefix is being
onboarded. Per minute: requests, completions, disconnects, server errors, TTFT p50/p99 and the engine's RSS
(its process tree, pid given or found by port). The same prompt always gets the same greedy output from a
correct engine, so the texts are kept per prompt to compare with a reference.

Operations:
  SoakConfig, soak_prompts(cfg)    the workload; its distinct prompts (token ids) by prompt id
  run_soak(url, model, cfg, pid)   SoakResult: per-minute rows, texts per prompt id
  server_pid(url), tree_rss_mb     the pid listening on the URL's port (this machine); RSS of a process tree
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated, Optional
from urllib.parse import urlparse

import psutil
import typer
from pydantic import Field

from kvbm_cli._errors import CheckFailed
from kvbm_cli._options import JsonOpt, ModelOpt, UrlOpt
from kvbm_cli._output import emit_json, err, out, table
from kvbm_cli.bench.client import RequestSpec, send
from kvbm_cli.bench.common import Keys, flags
from kvbm_cli.httpclient import async_client, server_model
from kvbm_cli.results import stats_of


class SoakConfig(Keys):
    """Soak workload: prompts are token ids, so every model's server takes them as they are."""

    minutes: float = Field(1.0, gt=0, description="How long to run.")
    concurrency: int = Field(6, ge=1, description="Clients in flight.")
    num_prefixes: int = Field(5, ge=1, description="Distinct shared prefixes.")
    prefix_tokens: int = Field(1536, ge=1, description="Tokens per prefix.")
    num_suffixes: int = Field(3, ge=1, description="Distinct suffixes per prefix (prompts repeat, so outputs can be "
                                                   "compared).")
    suffix_tokens: int = Field(64, ge=1, description="Tokens after the prefix.")
    max_tokens: int = Field(64, ge=1, description="Tokens to generate per request.")
    disconnect_fraction: float = Field(0.3, ge=0, le=1, description="Share of requests whose client disconnects "
                                                                    "at a random moment (0..1).")
    disconnect_min_s: float = Field(0.05, ge=0, description="Earliest disconnect, seconds after the request.")
    disconnect_max_s: float = Field(1.5, ge=0, description="Latest disconnect.")
    seed: int = Field(0, description="Seed of prompts and disconnects.")
    vocab: int = Field(2000, gt=10, description="Token ids are drawn from 10 up to this.")


@dataclass
class MinuteRow:
    """What one minute of the soak saw."""

    minute: int
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    errors: int = 0
    ttft_p50_ms: Optional[float] = None
    ttft_p99_ms: Optional[float] = None
    rss_mb: Optional[float] = None


@dataclass
class SoakResult:
    """Per-minute rows, every server error, and the greedy texts of completed requests per prompt id."""

    rows: list[MinuteRow]
    errors: list[str] = field(default_factory=list)
    texts: dict[str, list[str]] = field(default_factory=dict)
    rss_start_mb: Optional[float] = None
    rss_end_mb: Optional[float] = None

    @property
    def totals(self) -> dict[str, int]:
        return {k: sum(getattr(r, k) for r in self.rows) for k in ("requests", "completed", "disconnected", "errors")}


def soak_prompts(cfg: SoakConfig) -> dict[str, list[int]]:
    """Prompt id "p<prefix>s<suffix>" -> token ids (prefix then suffix)."""
    rng = random.Random(cfg.seed)
    prefixes = [[rng.randrange(10, cfg.vocab) for _ in range(cfg.prefix_tokens)] for _ in range(cfg.num_prefixes)]
    return {f"p{p}s{s}": prefixes[p] + [rng.randrange(10, cfg.vocab) for _ in range(cfg.suffix_tokens)]
            for p in range(cfg.num_prefixes) for s in range(cfg.num_suffixes)}


def server_pid(url: str) -> Optional[int]:
    """The pid of the process listening on the URL's port, if it is on this machine and visible."""
    port = urlparse(url).port
    with contextlib.suppress(psutil.AccessDenied, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    return None


def tree_rss_mb(pid: Optional[int]) -> Optional[float]:
    """Resident memory of a process and all its descendants (vLLM's API server, engine core, workers)."""
    if pid is None:
        return None
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return None
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            total += p.memory_info().rss
    return total / 2**20


def run_soak(url: str, model: str, cfg: SoakConfig, pid: Optional[int] = None, timeout_s: float = 300.0) -> SoakResult:
    """Run the soak against `url` for `cfg.minutes`."""
    prompts = soak_prompts(cfg)
    ids = sorted(prompts)
    rng = random.Random(cfg.seed + 1)
    start = time.perf_counter()
    deadline = start + cfg.minutes * 60
    n_minutes = max(1, int(-(-cfg.minutes // 1)))
    rows = [MinuteRow(m) for m in range(n_minutes)]
    ttfts: list[list[float]] = [[] for _ in rows]
    result = SoakResult(rows, rss_start_mb=tree_rss_mb(pid))
    counter = itertools.count(1)

    async def client_loop(client) -> None:
        while time.perf_counter() < deadline:
            pid_ = rng.choice(ids)
            spec = RequestSpec(request_id=f"soak-{next(counter)}", endpoint="completions", max_tokens=cfg.max_tokens,
                               prompt=prompts[pid_], extra={"temperature": 0})  # type: ignore[arg-type]
            minute = min(int((time.perf_counter() - start) // 60), n_minutes - 1)
            row = rows[minute]
            row.requests += 1
            cut = rng.uniform(cfg.disconnect_min_s, cfg.disconnect_max_s) if rng.random() < cfg.disconnect_fraction else None
            try:
                sent = await asyncio.wait_for(send(client, url, model, spec, run="soak", workload="soak",
                                                   ignore_eos=True), timeout=cut or timeout_s)
            except asyncio.TimeoutError:
                row.disconnected += 1  # the stream is closed: the server sees the client go
                continue
            if sent.record.error is not None:
                row.errors += 1
                result.errors.append(f"{spec.request_id} ({pid_}): {sent.record.error}")
                continue
            row.completed += 1
            ttfts[minute].append(sent.record.ttft_s * 1000)
            result.texts.setdefault(pid_, []).append(sent.text)

    async def sampler() -> None:
        while time.perf_counter() < deadline:
            await asyncio.sleep(min(5.0, max(0.0, deadline - time.perf_counter())))
            minute = min(int((time.perf_counter() - start - 1e-6) // 60), n_minutes - 1)
            rows[minute].rss_mb = tree_rss_mb(pid)

    async def main() -> None:
        async with async_client(cfg.concurrency, timeout_s) as client:
            await asyncio.gather(sampler(), *(client_loop(client) for _ in range(cfg.concurrency)))

    asyncio.run(main())
    for row, ttft in zip(rows, map(stats_of, ttfts)):  # no values: None
        row.ttft_p50_ms, row.ttft_p99_ms = ttft.p50, ttft.p99
    result.rss_end_mb = tree_rss_mb(pid)
    return result


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.0f}"


@flags(SoakConfig)
def soak(
    cfg: SoakConfig,
    url: UrlOpt = "http://localhost:8000",
    model: ModelOpt = None,
    pid: Annotated[Optional[int], typer.Option(help="Server pid for RSS (default: the process listening on the "
                                                    "URL's port, when it is on this machine).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Churn: concurrent streams, random client disconnects; per minute requests, errors, TTFT, RSS."""
    model = model or server_model(url)[0]
    pid = pid or server_pid(url)
    if pid is None:
        err().print("kvbm: no server pid found on this machine for RSS; pass --pid to report it")
    result = run_soak(url, model, cfg, pid)
    if json_out:
        emit_json({"rows": [asdict(r) for r in result.rows], "totals": result.totals, "errors": result.errors[:50],
                   "rss_start_mb": result.rss_start_mb, "rss_end_mb": result.rss_end_mb})
    else:
        out().print(table(f"soak {url} ({cfg.minutes:g} min, {cfg.concurrency} clients, {cfg.disconnect_fraction:.0%} "
                          "disconnect)", ["minute>", "requests>", "completed>", "disconnected>", "errors>",
                                          "TTFT p50 ms>", "TTFT p99 ms>", "RSS MB>"],
                          [(str(r.minute + 1), str(r.requests), str(r.completed), str(r.disconnected), str(r.errors),
                            _fmt(r.ttft_p50_ms), _fmt(r.ttft_p99_ms), _fmt(r.rss_mb)) for r in result.rows]))
        out().print(f"RSS {_fmt(result.rss_start_mb)} -> {_fmt(result.rss_end_mb)} MB; totals {result.totals}")
        for line in result.errors[:10]:
            err().print(f"error: {line}")
    if result.totals["errors"]:
        raise CheckFailed(f"{result.totals['errors']} requests failed on the server (first: {result.errors[0]})")
