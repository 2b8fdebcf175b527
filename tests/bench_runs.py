"""Bench result files in the schema `kvbm bench` writes (kvbm_cli.results), made up for report and gate tests:
per-request lognormal noise around given medians, optional recompute spikes, warm-up and failed requests."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from kvbm_cli.results import RequestRecord, summarize, write_run as write_files


def write_run(root: Path, name: str, *, n: int = 30, ttft_s: float = 0.2, itl_s: float = 0.02,
              output_tokens: int = 50, noise: float = 0.08, spike_every: int = 0, spike_factor: float = 5.0,
              warmup: int = 2, errors: int = 0, seed: int = 0, start: float = 1_790_000_000.0) -> Path:
    """Write <root>/requests.jsonl and summary.json with `n` measured requests; returns root."""
    rng = np.random.default_rng(seed)
    records, t = [], start
    for i in range(warmup + n + errors):
        is_warm, is_error = i < warmup, i >= warmup + n
        ttft = ttft_s * float(np.exp(rng.normal(0, noise)))
        if spike_every and i % spike_every == 0:
            ttft *= spike_factor
        itl = [itl_s * float(np.exp(rng.normal(0, noise))) for _ in range(output_tokens - 1)]
        e2e = ttft + sum(itl)
        records.append(RequestRecord(
            request_id=f"{name}-{i}", run=name, workload="prefix-reuse", start_s=t,
            ttft_s=None if is_error else ttft, itl_s=[] if is_error else itl, e2e_s=e2e, input_tokens=2128,
            output_tokens=0 if is_error else output_tokens, prefix_id=i % 5, warmup=is_warm,
            error="HTTP 500: engine error" if is_error else None))
        t += e2e + 0.01
    started = dt.datetime.fromtimestamp(start, dt.timezone.utc).isoformat(timespec="seconds")
    summary = summarize(records, run=name, workload="prefix-reuse", url="http://127.0.0.1:8000", model="tiny",
                        started_at=started, duration_s=t - start)
    write_files(root, records, summary)
    return root
