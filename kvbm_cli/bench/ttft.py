"""`kvbm bench ttft`: the same evicted-prefix request, four ways, in one run: recompute (vLLM alone, prefix
evicted), G1 hit (vLLM alone, prefix still cached), G2 onboard (KVBM: loaded back from host memory) and G3 onboard
(KVBM with a host tier too small for it: loaded back from disk).

Three engines are started in turn. Each trial sends a fresh prefix, pushes it out of vLLM's cache with filler
prompts and times the first token of the prefix with a new suffix; KVBM's metrics confirm the serving tier.

Operations:
  first_token_seconds(url, model, tokens)   seconds to the first streamed token of a greedy completion
  run_ttft_bench(...), ttft                 the four cases: {name: (TTFTs in seconds, note)}; the command
"""

from __future__ import annotations

import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import httpx
import typer

from kvbm_cli import prom
from kvbm_cli._errors import CheckFailed, CliError
from kvbm_cli._options import JsonOpt, ModelOpt
from kvbm_cli._output import emit_json, out, table
from kvbm_cli.engine import Engine, EngineSpec, build_launch, free_port, kvbm_metrics_on, start_and_wait


def first_token_seconds(url: str, model: str, tokens: list[int], max_tokens: int = 2) -> float:
    """Seconds to the first streamed token of a greedy completion of `tokens` (exact token ids)."""
    body = {"model": model, "prompt": tokens, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: ") and not line.startswith("data: [DONE]"):
                return time.perf_counter() - start
    raise CheckFailed(f"the engine at {url} streamed no token")


def run_ttft_bench(*, model_dir: Path, vocab: int, block_size: int, prefix_tokens: int, suffix_tokens: int,
                   trials: int, g1_bytes: int, g1_blocks: int, health_timeout: float, log_dir: Path,
                   seed: int = 0) -> dict[str, tuple[list[float], str]]:
    """Measure the four cases in order (recompute first): {case: (TTFT seconds per trial, note)}."""
    rng = random.Random(seed)
    prompt_blocks = math.ceil((prefix_tokens + suffix_tokens) / block_size)
    num_fillers = math.ceil(g1_blocks / prompt_blocks) + 1  # enough to push the prefix out of vLLM's cache

    def tokens(n: int) -> list[int]:
        return [rng.randrange(10, vocab - 10) for _ in range(n)]

    plan = [{"prefix": tokens(prefix_tokens), "suffixes": [tokens(suffix_tokens) for _ in range(3)],
             "fillers": [tokens(prefix_tokens + suffix_tokens) for _ in range(num_fillers)]} for _ in range(trials)]
    cases: dict[str, tuple[list[float], str]] = {name: ([], "") for name in
                                                  ("recompute", "G1 hit", "G2 onboard", "G3 onboard")}
    shared = dict(model=str(model_dir), kv_cache_memory_bytes=g1_bytes, block_size=block_size,
                  max_model_len=min(prompt_blocks * block_size * 2, (g1_blocks - 1) * block_size))
    engines = [("baseline", {}, None), ("g2", {"DYN_KVBM_CPU_CACHE_GB": "1"}, "kvbm_onboard_blocks_h2d"),
               ("g3", {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(prompt_blocks + 2),
                       "DYN_KVBM_DISK_CACHE_GB": "0.5", "DYN_KVBM_DISK_CACHE_DIR": str(log_dir),
                       "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}, "kvbm_onboard_blocks_d2d")]
    for label, env, counter in engines:
        spec = EngineSpec(connector="kvbm" if counter else "none", port=free_port(), env=env, **shared)
        metrics = kvbm_metrics_on(spec) if counter else ""
        engine = Engine(build_launch(spec), log_path=log_dir / f"{label}.log")
        try:
            start_and_wait(engine, health_timeout, label)
            url, model = engine.launch.url, engine.launch.model  # the served name (kvbm-tiny for the tiny one)
            for trial in plan:
                prompts = [trial["prefix"] + suffix for suffix in trial["suffixes"]]
                first_token_seconds(url, model, prompts[0])
                if not counter:
                    cases["G1 hit"][0].append(first_token_seconds(url, model, prompts[1]))
                for filler in trial["fillers"]:
                    first_token_seconds(url, model, filler)
                case = f"{label.upper()} onboard" if counter else "recompute"
                before = prom.total(prom.scrape(metrics), counter) if counter else 0
                cases[case][0].append(first_token_seconds(url, model, prompts[2]))
                loaded = prom.total(prom.scrape(metrics), counter) - before if counter else math.inf
                if loaded < prefix_tokens // block_size:
                    cases[case] = (cases[case][0], f"only {loaded:.0f} blocks came from {label.upper()} in a trial")
        finally:
            engine.stop()
    return cases


def ttft(
    model: ModelOpt = None,
    prefix_tokens: Annotated[int, typer.Option(min=1, help="Tokens of the shared prefix.")] = 1536,
    suffix_tokens: Annotated[int, typer.Option(min=1, help="New tokens after the prefix.")] = 64,
    trials: Annotated[int, typer.Option(min=1, help="Fresh prefixes measured per case (median reported).")] = 5,
    g1_blocks: Annotated[int, typer.Option(min=4, help="vLLM's own cache size in blocks (small, so prefixes are evicted).")] = 48,
    block_size: Annotated[int, typer.Option(help="Tokens per block (vLLM's CPU build: a multiple of 32).")] = 128,
    health_timeout: Annotated[float, typer.Option(help="Seconds each engine may take to become healthy.")] = 300.0,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Directory for engine logs and the JSON result (default: a temp dir).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """TTFT of one evicted-prefix request: recompute, vLLM G1 hit, KVBM onboard from G2 and from G3."""
    from kvbm import sizing
    from kvbm_cli._models import load_model_config
    from kvbm_cli.tiny_model import default_model_dir

    model_dir = Path(model).expanduser() if model else default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise CliError(f"--model {model_dir}: not a model directory (no config.json); give a local model directory")
    _, cfg, _ = load_model_config(str(model_dir))
    if (prefix_tokens + suffix_tokens) // block_size + 2 > g1_blocks:
        raise CliError(f"--g1-blocks {g1_blocks} cannot hold one {prefix_tokens + suffix_tokens}-token prompt; raise it")
    log_dir = out_dir or Path(tempfile.mkdtemp(prefix="kvbm-bench-ttft-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    g1_bytes = g1_blocks * block_size * sizing.ModelGeometry.from_config(cfg).kv_bytes_per_token()
    cases = run_ttft_bench(model_dir=model_dir, vocab=int(cfg.get("vocab_size", 2048)), block_size=block_size,
                           prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens, trials=trials, g1_bytes=g1_bytes,
                           g1_blocks=g1_blocks, health_timeout=health_timeout, log_dir=log_dir)
    recompute = statistics.median(cases["recompute"][0])
    rows = [{"case": name, "ttft_p50_ms": round(statistics.median(ts) * 1e3, 2),
             "speedup_vs_recompute": round(recompute / statistics.median(ts), 2),
             "ttft_ms": [round(t * 1e3, 2) for t in ts], "note": note} for name, (ts, note) in cases.items()]
    (log_dir / "ttft.json").write_text(json.dumps(rows, indent=2))
    if as_json:
        emit_json(rows)
        return
    out().print(table(f"kvbm bench ttft: {prefix_tokens}-token prefix + {suffix_tokens} new tokens, {trials} trials, "
                      f"G1 {g1_blocks} blocks of {block_size} tokens",
                      ["case", "TTFT p50 (ms)>", "speedup vs recompute>", "trials (ms)", "note"],
                      [(r["case"], f"{r['ttft_p50_ms']:.1f}", f"{r['speedup_vs_recompute']:.2f}x",
                        " ".join(f"{t:.0f}" for t in r["ttft_ms"]), r["note"]) for r in rows]))
    out().print(f"logs and ttft.json in {log_dir}", markup=False, soft_wrap=True)
