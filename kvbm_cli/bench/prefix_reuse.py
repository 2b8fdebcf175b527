"""`kvbm bench prefix-reuse`: the seed demo's workload with genai-perf's flags, prompts exact in server tokens.

Each request is one of `--num-prefix-prompts` shared prefixes of `--prefix-prompt-length` tokens and a random
suffix of `--synthetic-input-tokens-mean` (+- stddev) tokens, exact as the server counts them (the chat template's
head belongs to the prefix, its tail to the suffix). Prefixes are picked at random as genai-perf does, or in turn
(`--prefix-order round-robin`: the worst case for an LRU cache that holds fewer than all of them).

Operations:
  PrefixReuseConfig, make_requests(cfg, tok)   the options (field names = flag names), the requests (warm-up
                                               first; same seed, same prompts)
"""

from __future__ import annotations

import random
from typing import Optional

from pydantic import Field

from kvbm_cli._errors import CliError
from kvbm_cli._options import Endpoint, PrefixOrder
from kvbm_cli.bench import common
from kvbm_cli.bench.client import RequestSpec, Target
from kvbm_cli.bench.prompts import PromptTokenizer, build_prefix, build_prompt


class PrefixReuseConfig(common.WorkloadConfig):
    """Shared long prefixes cycling through the engine's cache (Dynamo's KVBM demo with genai-perf's flags)."""

    name = "prefix-reuse"
    drivers = ("native", "aiperf", "genai-perf")
    prefix_prompt_length: int = Field(0, ge=0, description="Tokens of each shared prefix (template head included).")
    num_prefix_prompts: int = Field(0, ge=0, description="How many distinct prefixes the requests cycle through.")
    synthetic_input_tokens_mean: int = Field(550, ge=1, description="Tokens after the prefix (mean).")
    synthetic_input_tokens_stddev: float = Field(0.0, ge=0, description="Standard deviation of those tokens.")
    output_tokens_mean: Optional[int] = Field(50, ge=1, description="Tokens to generate per request (exact: "
                                                                    "min_tokens and ignore_eos are sent).")
    output_tokens_stddev: float = Field(0.0, description="Standard deviation of the output tokens.")
    concurrency: Optional[int] = Field(None, ge=1, description="Requests in flight (default 1 unless "
                                                               "--request-rate).")
    request_rate: Optional[float] = Field(None, gt=0, description="Requests started per second, instead of "
                                                                  "--concurrency.")
    request_count: int = Field(10, ge=1, description="Measured requests.")
    warmup_request_count: int = Field(0, ge=0, description="Requests sent first and left out of the statistics.")
    endpoint_type: Endpoint = Field("chat", description="chat (/v1/chat/completions) or completions "
                                                        "(/v1/completions).")
    streaming: bool = Field(True, description="Stream tokens (TTFT and ITL need it).")
    random_seed: int = Field(0, description="Seed of prefixes, suffixes and prefix choice.")
    prefix_order: PrefixOrder = Field("random", description="random (genai-perf) or round-robin (each prefix "
                                                            "returns after all others: worst case for an LRU cache).")
    ignore_eos: bool = Field(True, description="Generate exactly the output tokens asked for, end of text or not.")

    def validate(self) -> None:
        if (self.prefix_prompt_length > 0) != (self.num_prefix_prompts > 0):
            raise CliError("--prefix-prompt-length and --num-prefix-prompts go together: give both (or neither)")
        if self.concurrency is not None and self.request_rate is not None:
            raise CliError("give --concurrency or --request-rate, not both")

    async def drive(self, tok: PromptTokenizer, target: Target) -> dict[str, int]:
        return await target.send_all(make_requests(self, tok), request_rate=self.request_rate,
                                     concurrency=self.concurrency or (None if self.request_rate else 1),
                                     streaming=self.streaming, ignore_eos=self.ignore_eos)


def _sample(rng: random.Random, mean: float, stddev: float, minimum: int = 1) -> int:
    return max(minimum, round(rng.gauss(mean, stddev))) if stddev > 0 else int(mean)


def make_requests(cfg: PrefixReuseConfig, tok: PromptTokenizer) -> list[RequestSpec]:
    """Warm-up requests, then `request_count` measured ones; same seed, same prompts."""
    rng = random.Random(cfg.random_seed)
    ep = cfg.endpoint_type
    prefixes = [build_prefix(tok, ep, cfg.prefix_prompt_length, rng) for _ in range(cfg.num_prefix_prompts)]
    head, tail = tok.head_tail(ep)
    specs = []
    for k in range(cfg.warmup_request_count + cfg.request_count):
        warm = k < cfg.warmup_request_count
        n_in = _sample(rng, cfg.synthetic_input_tokens_mean, cfg.synthetic_input_tokens_stddev)
        if prefixes:
            pid = (k % len(prefixes)) if cfg.prefix_order == "round-robin" else rng.randrange(len(prefixes))
            prefix, prefix_tokens, n_total = prefixes[pid], cfg.prefix_prompt_length, cfg.prefix_prompt_length + n_in
        else:
            pid, prefix, prefix_tokens, n_total = None, "", head, max(n_in, head + tail)
        text = build_prompt(tok, ep, prefix, prefix_tokens, n_total, rng)
        n_out = None if cfg.output_tokens_mean is None else _sample(rng, cfg.output_tokens_mean, cfg.output_tokens_stddev)
        rid = f"warmup-{k}" if warm else f"req-{k - cfg.warmup_request_count}"
        specs.append(RequestSpec(request_id=rid, endpoint=ep, max_tokens=n_out, prompt=text,
                                 expected_input_tokens=n_total, prefix_id=pid, warmup=warm))
    return specs
