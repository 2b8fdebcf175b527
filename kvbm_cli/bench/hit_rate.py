"""`kvbm bench hit-rate`: throughput at a controlled hit rate, the way vLLM's offloading blog measures it.

Every measured request has the same shape: a `--prefix-tokens` prefix (chat template head included; a multiple
of the engine's block size) and fresh words up to `--input-tokens`, then `--output-tokens` generated. A share
`--hit-rate` of them reuse a prefix that was computed earlier and has since been evicted from vLLM's own cache
(G1); the others bring a prefix nobody has seen. Before the measured requests (all left out of the statistics):

  1. prime: one request per reused prefix (prefix + a few fresh tokens, 1 token out), so the prefix's blocks
     are computed once (and, with KVBM, offloaded to its tiers);
  2. flush: `--flush-request-count` fresh requests of the measured shape, enough to push the primed prefixes
     out of G1 (size G1 to hold fewer than that many requests).

Then the `--request-count` measured requests at `--concurrency`: the baseline recomputes a reused prefix, KVBM
onboards it. Each reused prefix is used by one measured request only, so no measured request can hit G1 on
another's account; the figure to read is requests/s against the baseline at each hit rate. Hit requests carry
the primed prefix's index as prefix_id; misses none.

Operations:
  HitRateConfig                            the options (field names = flag names)
  make_requests(cfg, tok)                  prime + flush (warm-up) and measured requests; same seed, same prompts
  run_hit_rate(cfg, ...)                   run them and write requests.jsonl + summary.json
  kvbm bench hit-rate ...                  the command
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kvbm_cli._errors import CliError
from kvbm_cli._options import ArtifactOpt, Endpoint, JsonOpt, ModelOpt, RunOpt, TimeoutOpt, TokenizerOpt, UrlOpt
from kvbm_cli.bench import common
from kvbm_cli.bench.client import RequestSpec, run_requests
from kvbm_cli.bench.prompts import ENDPOINTS, PromptTokenizer, build_prefix, build_prompt
from kvbm_cli.results import Summary, iso_now

WORKLOAD = "hit-rate"
PRIME_FRESH_TOKENS = 8  # fresh words after a primed prefix: its last prefix block is full and computed


class HitRateConfig(common.Keys):
    """Options of the controlled-hit-rate workload."""

    prefix_tokens: int = 1024
    input_tokens: int = 1152
    output_tokens: int = 16
    hit_rate: float = 0.5
    request_count: int = 48
    concurrency: int = 8
    flush_request_count: int = 16
    endpoint_type: str = "chat"
    random_seed: int = 0

    def validate(self) -> None:
        if self.endpoint_type not in ENDPOINTS:
            raise CliError(f"--endpoint-type must be chat or completions, not {self.endpoint_type!r}")
        if not 0.0 <= self.hit_rate <= 1.0:
            raise CliError(f"--hit-rate must be between 0 and 1 (a share of the requests), not {self.hit_rate}")
        if self.prefix_tokens < 1 or self.input_tokens <= self.prefix_tokens:
            raise CliError(f"--input-tokens ({self.input_tokens}) must be larger than --prefix-tokens "
                           f"({self.prefix_tokens}), and --prefix-tokens >= 1")
        if self.output_tokens < 1 or self.request_count < 1 or self.concurrency < 1:
            raise CliError("--output-tokens, --request-count and --concurrency must be >= 1")
        if self.flush_request_count < 0:
            raise CliError("--flush-request-count must be >= 0")

    @property
    def hits(self) -> int:
        """Measured requests that reuse a primed prefix."""
        return round(self.hit_rate * self.request_count)


def make_requests(cfg: HitRateConfig, tok: PromptTokenizer) -> list[RequestSpec]:
    """Prime and flush requests (warm-up, in that order), then the measured ones; deterministic for a seed."""
    rng = random.Random(cfg.random_seed)
    ep = cfg.endpoint_type
    _, tail = tok.head_tail(ep)
    hit_at = sorted(rng.sample(range(cfg.request_count), cfg.hits))
    primed = [build_prefix(tok, ep, cfg.prefix_tokens, rng) for _ in hit_at]
    specs = []
    for i, prefix in enumerate(primed):
        n = cfg.prefix_tokens + tail + PRIME_FRESH_TOKENS
        specs.append(RequestSpec(request_id=f"prime-{i}", endpoint=ep, max_tokens=1, prefix_id=i, warmup=True,
                                 prompt=build_prompt(tok, ep, prefix, cfg.prefix_tokens, n, rng),
                                 expected_input_tokens=n))
    for i in range(cfg.flush_request_count):
        prefix = build_prefix(tok, ep, cfg.prefix_tokens, rng)
        specs.append(RequestSpec(request_id=f"flush-{i}", endpoint=ep, max_tokens=1, warmup=True,
                                 prompt=build_prompt(tok, ep, prefix, cfg.prefix_tokens, cfg.input_tokens, rng),
                                 expected_input_tokens=cfg.input_tokens))
    which = {k: i for i, k in enumerate(hit_at)}
    for k in range(cfg.request_count):
        pid = which.get(k)
        prefix = primed[pid] if pid is not None else build_prefix(tok, ep, cfg.prefix_tokens, rng)
        specs.append(RequestSpec(request_id=f"req-{k}", endpoint=ep, max_tokens=cfg.output_tokens, prefix_id=pid,
                                 prompt=build_prompt(tok, ep, prefix, cfg.prefix_tokens, cfg.input_tokens, rng),
                                 expected_input_tokens=cfg.input_tokens))
    return specs


def run_hit_rate(cfg: HitRateConfig, *, url: str, model: Optional[str], tokenizer: Optional[str],
                 artifact_dir: Path, run: str, engine: Optional[dict[str, Any]] = None, timeout_s: float = 600.0,
                 show_progress: bool = True, driver: str = "native") -> Summary:
    """Run prime, flush and measured requests against `url`; requests.jsonl + summary.json in `artifact_dir`."""
    cfg.validate()
    if driver != "native":
        raise CliError("kvbm bench hit-rate runs with the native client only (--driver native): its prime and "
                       "flush phases have no aiperf or genai-perf equivalent")
    model, tok_source = common.resolve_model_and_tokenizer(url, model, tokenizer)
    specs = make_requests(cfg, PromptTokenizer(tok_source))
    writer = common.ArtifactWriter(artifact_dir)
    started_at = iso_now()
    asyncio.run(run_requests(specs, url, model, run=run, workload=WORKLOAD, concurrency=cfg.concurrency,
                             timeout_s=timeout_s, on_done=writer.add, show_progress=show_progress))
    return common.finish_run(writer.records, artifact_dir, run=run, workload=WORKLOAD, url=url, model=model,
                             driver="native", started_at=started_at,
                             config=cfg.model_dump() | {"tokenizer": tok_source, "hit_requests": cfg.hits},
                             engine=engine, expected={s.request_id: s.expected_input_tokens for s in specs})


# --- the plot ----------------------------------------------------------------------------------------------

# --- the command -------------------------------------------------------------------------------------------

def hit_rate(
    url: UrlOpt = "http://localhost:8000",
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    hit_rate_: Annotated[float, typer.Option("--hit-rate", help="Share of measured requests (0..1) whose prefix "
                                                                "was computed earlier and evicted from G1.")] = 0.5,
    prefix_tokens: Annotated[int, typer.Option(help="Tokens of each request's prefix (template head included; a "
                                                    "multiple of the block size).")] = 1024,
    input_tokens: Annotated[int, typer.Option(help="Prompt tokens of every measured request.")] = 1152,
    output_tokens: Annotated[int, typer.Option(help="Tokens generated per measured request (exact).")] = 16,
    request_count: Annotated[int, typer.Option(help="Measured requests.")] = 48,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 8,
    flush_request_count: Annotated[int, typer.Option(help="Fresh requests sent after priming to evict the primed "
                                                          "prefixes from G1 (more than G1 holds).")] = 16,
    endpoint_type: Annotated[Endpoint, typer.Option(help="chat or completions.")] = Endpoint.chat,
    random_seed: Annotated[int, typer.Option(help="Seed of prefixes, suffixes and which requests hit.")] = 0,
    artifact_dir: ArtifactOpt = None,
    run: RunOpt = None,
    request_timeout: TimeoutOpt = 600.0,
    json_out: JsonOpt = False,
) -> None:
    """Throughput when a set share of requests reuses a prefix evicted from G1 (vLLM's offloading-blog method)."""
    cfg = HitRateConfig(prefix_tokens=prefix_tokens, input_tokens=input_tokens, output_tokens=output_tokens,
                        hit_rate=hit_rate_, request_count=request_count, concurrency=concurrency,
                        flush_request_count=flush_request_count, endpoint_type=Endpoint(endpoint_type).value,
                        random_seed=random_seed)
    cfg.validate()
    artifact_dir = artifact_dir or Path("runs") / WORKLOAD
    summary = run_hit_rate(cfg, url=url, model=model, tokenizer=tokenizer, artifact_dir=artifact_dir,
                           run=run or artifact_dir.name, timeout_s=request_timeout, show_progress=not json_out)
    common.print_summary(summary, artifact_dir, json_out)
