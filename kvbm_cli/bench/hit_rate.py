"""`kvbm bench hit-rate`: throughput at a controlled hit rate, the way vLLM's offloading blog measures it.

Every measured request is a `--prefix-tokens` prefix (chat template head included; a multiple of the block size)
plus fresh words up to `--input-tokens`, then `--output-tokens` generated. A share `--hit-rate` of them reuse a
prefix computed earlier and since evicted from vLLM's own cache (G1); the others bring an unseen prefix. Warm-up
(left out of the statistics): one prime request per reused prefix (its blocks computed once, and offloaded with
KVBM), then `--flush-request-count` fresh requests to push the primed prefixes out of G1 (size G1 below that).
Each reused prefix serves one measured request only, so no request hits G1 on another's account: read
requests/s against the baseline at each hit rate. Hit requests carry the primed prefix's index as prefix_id.

Operations:
  HitRateConfig              the options (field names = flag names)
  make_requests(cfg, tok)    prime + flush (warm-up) and measured requests; same seed, same prompts
"""

from __future__ import annotations

import random

from pydantic import Field, computed_field

from kvbm_cli._errors import CliError
from kvbm_cli._options import Endpoint
from kvbm_cli.bench import common
from kvbm_cli.bench.client import RequestSpec, Target
from kvbm_cli.bench.prompts import PromptTokenizer, build_prefix, build_prompt

PRIME_FRESH_TOKENS = 8  # fresh words after a primed prefix: its last prefix block is full and computed


class HitRateConfig(common.WorkloadConfig):
    """Throughput when a set share of requests reuses a prefix evicted from G1 (vLLM's offloading-blog method)."""

    name = "hit-rate"
    hit_rate: float = Field(0.5, description="Share of measured requests (0..1) whose prefix was computed earlier "
                                             "and evicted from G1.")
    prefix_tokens: int = Field(1024, ge=1, description="Tokens of each request's prefix (template head included; a "
                                                       "multiple of the block size).")
    input_tokens: int = Field(1152, description="Prompt tokens of every measured request.")
    output_tokens: int = Field(16, ge=1, description="Tokens generated per measured request (exact).")
    request_count: int = Field(48, ge=1, description="Measured requests.")
    concurrency: int = Field(8, ge=1, description="Requests in flight.")
    flush_request_count: int = Field(16, ge=0, description="Fresh requests sent after priming to evict the primed "
                                                           "prefixes from G1 (more than G1 holds).")
    endpoint_type: Endpoint = Field("chat", description="chat or completions.")
    random_seed: int = Field(0, description="Seed of prefixes, suffixes and which requests hit.")

    def validate(self) -> None:
        if not 0.0 <= self.hit_rate <= 1.0:
            raise CliError(f"--hit-rate must be between 0 and 1 (a share of the requests), not {self.hit_rate}")
        if self.input_tokens <= self.prefix_tokens:
            raise CliError(f"--input-tokens ({self.input_tokens}) must be larger than --prefix-tokens "
                           f"({self.prefix_tokens})")

    @computed_field
    @property
    def hits(self) -> int:
        """Measured requests that reuse a primed prefix."""
        return round(self.hit_rate * self.request_count)

    async def drive(self, tok: PromptTokenizer, target: Target) -> dict[str, int]:
        return await target.send_all(make_requests(self, tok), concurrency=self.concurrency)


def make_requests(cfg: HitRateConfig, tok: PromptTokenizer) -> list[RequestSpec]:
    """Prime and flush requests (warm-up, in that order), then the measured ones; deterministic for a seed."""
    rng = random.Random(cfg.random_seed)
    ep = cfg.endpoint_type
    _, tail = tok.head_tail(ep)
    hit_at = sorted(rng.sample(range(cfg.request_count), cfg.hits))
    primed = [build_prefix(tok, ep, cfg.prefix_tokens, rng) for _ in hit_at]

    def spec(request_id: str, prefix: str, n: int, **labels) -> RequestSpec:
        return RequestSpec(request_id=request_id, endpoint=ep, expected_input_tokens=n,
                           prompt=build_prompt(tok, ep, prefix, cfg.prefix_tokens, n, rng), **labels)

    n_prime = cfg.prefix_tokens + tail + PRIME_FRESH_TOKENS
    specs = [spec(f"prime-{i}", prefix, n_prime, max_tokens=1, prefix_id=i, warmup=True)
             for i, prefix in enumerate(primed)]
    specs += [spec(f"flush-{i}", build_prefix(tok, ep, cfg.prefix_tokens, rng), cfg.input_tokens, max_tokens=1,
                   warmup=True) for i in range(cfg.flush_request_count)]
    which = {k: i for i, k in enumerate(hit_at)}
    for k in range(cfg.request_count):
        pid = which.get(k)
        prefix = primed[pid] if pid is not None else build_prefix(tok, ep, cfg.prefix_tokens, rng)
        specs.append(spec(f"req-{k}", prefix, cfg.input_tokens, max_tokens=cfg.output_tokens, prefix_id=pid))
    return specs
