"""`kvbm bench prefix-reuse`: the seed demo's workload with genai-perf's flags, prompts exact in server tokens.

Each request is one of `--num-prefix-prompts` shared prefixes of `--prefix-prompt-length` tokens followed by a
random suffix of `--synthetic-input-tokens-mean` (+- stddev) tokens: the prompt is exactly prefix + suffix
tokens as the server counts them (chat template included: its head belongs to the prefix, its tail to the
suffix). Prefixes are picked at random as genai-perf does, or in turn (`--prefix-order round-robin`: each
prefix comes back after all the others, the worst case for an LRU cache that holds fewer than all of them).

Operations:
  PrefixReuseConfig                    the workload options (field names = flag names)
  make_requests(cfg, tok)              the request list (warm-up first), deterministic for a seed
  run_prefix_reuse(cfg, ...)           run it with the chosen driver and write the result files
  kvbm bench prefix-reuse ...          the command
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kvbm_cli._options import ArtifactOpt, Driver, DriverOpt, Endpoint, JsonOpt, ModelOpt, PrefixOrder, RunOpt, TimeoutOpt, TokenizerOpt, UrlOpt
from kvbm_cli._errors import CliError
from kvbm_cli.bench import common
from kvbm_cli.bench.client import RequestSpec, run_requests
from kvbm_cli.bench.prompts import ENDPOINTS, PromptTokenizer, build_prefix, build_prompt
from kvbm_cli.results import Summary

WORKLOAD = "prefix-reuse"


class PrefixReuseConfig(common.Keys):
    """Options of the prefix-reuse workload; names follow genai-perf's flags."""

    prefix_prompt_length: int = 0
    num_prefix_prompts: int = 0
    synthetic_input_tokens_mean: int = 550
    synthetic_input_tokens_stddev: float = 0.0
    output_tokens_mean: Optional[int] = 50
    output_tokens_stddev: float = 0.0
    concurrency: Optional[int] = 1
    request_rate: Optional[float] = None
    request_count: int = 10
    warmup_request_count: int = 0
    endpoint_type: str = "chat"
    streaming: bool = True
    random_seed: int = 0
    prefix_order: str = "random"
    ignore_eos: bool = True

    def validate(self) -> None:
        if self.endpoint_type not in ENDPOINTS:
            raise CliError(f"--endpoint-type must be chat or completions, not {self.endpoint_type!r}")
        if self.prefix_order not in ("random", "round-robin"):
            raise CliError(f"--prefix-order must be random or round-robin, not {self.prefix_order!r}")
        if (self.prefix_prompt_length > 0) != (self.num_prefix_prompts > 0):
            raise CliError("--prefix-prompt-length and --num-prefix-prompts go together: give both (or neither)")
        if self.prefix_prompt_length < 0 or self.num_prefix_prompts < 0:
            raise CliError("--prefix-prompt-length and --num-prefix-prompts must be >= 0")
        if self.synthetic_input_tokens_mean < 1 or self.synthetic_input_tokens_stddev < 0:
            raise CliError("--synthetic-input-tokens-mean must be >= 1 and --synthetic-input-tokens-stddev >= 0")
        if self.output_tokens_mean is not None and self.output_tokens_mean < 1:
            raise CliError("--output-tokens-mean must be >= 1")
        if self.request_count < 1 or self.warmup_request_count < 0:
            raise CliError("--request-count must be >= 1 and --warmup-request-count >= 0")
        if self.request_rate is not None and self.request_rate <= 0:
            raise CliError("--request-rate must be > 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise CliError("--concurrency must be >= 1")


def _sample(rng: random.Random, mean: float, stddev: float, minimum: int = 1) -> int:
    return max(minimum, round(rng.gauss(mean, stddev))) if stddev > 0 else int(mean)


def make_requests(cfg: PrefixReuseConfig, tok: PromptTokenizer) -> list[RequestSpec]:
    """Warm-up requests, then `request_count` measured ones; same seed, same prompts."""
    rng = random.Random(cfg.random_seed)
    ep = cfg.endpoint_type
    prefixes = [build_prefix(tok, ep, cfg.prefix_prompt_length, rng) for _ in range(cfg.num_prefix_prompts)]
    head, tail = tok.head_tail(ep)
    specs = []
    total = cfg.warmup_request_count + cfg.request_count
    for k in range(total):
        warm = k < cfg.warmup_request_count
        n_in = _sample(rng, cfg.synthetic_input_tokens_mean, cfg.synthetic_input_tokens_stddev)
        if prefixes:
            pid = (k % len(prefixes)) if cfg.prefix_order == "round-robin" else rng.randrange(len(prefixes))
            prefix, prefix_tokens = prefixes[pid], cfg.prefix_prompt_length
        else:
            pid, prefix, prefix_tokens = None, "", head
            n_in = max(n_in, head + tail)
        n_total = (cfg.prefix_prompt_length if prefixes else 0) + n_in
        text = build_prompt(tok, ep, prefix, prefix_tokens, n_total, rng)
        n_out = None if cfg.output_tokens_mean is None else _sample(rng, cfg.output_tokens_mean, cfg.output_tokens_stddev)
        rid = f"warmup-{k}" if warm else f"req-{k - cfg.warmup_request_count}"
        specs.append(RequestSpec(request_id=rid, endpoint=ep, max_tokens=n_out, prompt=text,
                                 expected_input_tokens=n_total, prefix_id=pid, warmup=warm))
    return specs


def run_prefix_reuse(cfg: PrefixReuseConfig, *, url: str, model: Optional[str], tokenizer: Optional[str],
                     artifact_dir: Path, run: str, driver: str = "native", engine: Optional[dict[str, Any]] = None,
                     timeout_s: float = 600.0, show_progress: bool = True) -> Summary:
    """Run the workload against `url` and write requests.jsonl + summary.json under `artifact_dir`."""
    cfg.validate()

    async def drive(model: str, tok: PromptTokenizer, writer: common.ArtifactWriter) -> dict[str, int]:
        specs = make_requests(cfg, tok)
        await run_requests(specs, url, model, run=run, workload=WORKLOAD, concurrency=cfg.concurrency,
                           request_rate=cfg.request_rate, streaming=cfg.streaming, ignore_eos=cfg.ignore_eos,
                           timeout_s=timeout_s, on_done=writer.add, show_progress=show_progress)
        return {s.request_id: s.expected_input_tokens for s in specs}

    return common.run_workload(cfg, WORKLOAD, drive, url=url, model=model, tokenizer=tokenizer,
                               artifact_dir=artifact_dir, run=run, engine=engine, driver=driver)


def prefix_reuse(
    url: UrlOpt = "http://localhost:8000",
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    prefix_prompt_length: Annotated[int, typer.Option(help="Tokens of each shared prefix (template head included).")] = 0,
    num_prefix_prompts: Annotated[int, typer.Option(help="How many distinct prefixes the requests cycle through.")] = 0,
    synthetic_input_tokens_mean: Annotated[int, typer.Option(help="Tokens after the prefix (mean).")] = 550,
    synthetic_input_tokens_stddev: Annotated[float, typer.Option(help="Standard deviation of those tokens.")] = 0.0,
    output_tokens_mean: Annotated[int, typer.Option(help="Tokens to generate per request (exact: min_tokens and "
                                                         "ignore_eos are sent).")] = 50,
    output_tokens_stddev: Annotated[float, typer.Option(help="Standard deviation of the output tokens.")] = 0.0,
    concurrency: Annotated[Optional[int], typer.Option(help="Requests in flight (default 1 unless "
                                                            "--request-rate).")] = None,
    request_rate: Annotated[Optional[float], typer.Option(help="Requests started per second, instead of "
                                                               "--concurrency.")] = None,
    request_count: Annotated[int, typer.Option(help="Measured requests.")] = 10,
    warmup_request_count: Annotated[int, typer.Option(help="Requests sent first and left out of the statistics.")] = 0,
    endpoint_type: Annotated[Endpoint, typer.Option(help="chat (/v1/chat/completions) or completions (/v1/completions).")] = Endpoint.chat,
    streaming: Annotated[bool, typer.Option("--streaming/--no-streaming", help="Stream tokens (TTFT and ITL need "
                                                                               "it).")] = True,
    random_seed: Annotated[int, typer.Option(help="Seed of prefixes, suffixes and prefix choice.")] = 0,
    prefix_order: Annotated[PrefixOrder, typer.Option(help="random (genai-perf) or round-robin (each prefix returns "
                                                           "after all others: worst case for an LRU cache).")] = PrefixOrder.random,
    artifact_dir: ArtifactOpt = None,
    run: RunOpt = None,
    driver: DriverOpt = Driver.native,
    request_timeout: TimeoutOpt = 600.0,
    json_out: JsonOpt = False,
) -> None:
    """Shared long prefixes cycling through the engine's cache (Dynamo's KVBM demo with genai-perf's flags)."""
    if concurrency is not None and request_rate is not None:
        raise CliError("give --concurrency or --request-rate, not both")
    options = {k: v for k, v in locals().items() if k in PrefixReuseConfig.model_fields}
    cfg = PrefixReuseConfig(**options | {"concurrency": None if request_rate else (concurrency or 1),
                                         "endpoint_type": Endpoint(endpoint_type).value,
                                         "prefix_order": PrefixOrder(prefix_order).value})
    cfg.validate()
    driver = Driver(driver).value
    if driver != "native":
        from kvbm_cli.bench.drivers import find_tool

        find_tool(driver)  # fail before contacting the server
    common.run_command(run_prefix_reuse, cfg, WORKLOAD, artifact_dir=artifact_dir, run=run, json_out=json_out, url=url,
                       model=model, tokenizer=tokenizer, driver=driver, timeout_s=request_timeout)
