"""The one Prometheus text parser (prometheus_client.parser) and what the toolkit reads from a scrape.

Operations:
  parse(text) / scrape(url)      {sample name: [(labels, value), ...]} of a text exposition / of url's /metrics
  total(metrics, name, **match)  sum of a sample over the label sets that match
  histogram(metrics, name) / histogram_quantile(q, buckets)   sum, count, cumulative buckets / Prometheus' estimate
"""

from __future__ import annotations

import math
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families

from kvbm_cli import httpclient

Metrics = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Metrics:
    """Every sample of a Prometheus text exposition, by sample name (e.g. vllm:prompt_tokens_total)."""
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def scrape(url: str) -> Metrics:
    """The samples at `url` (a base URL gets /metrics); empty when nothing answers."""
    try:
        return parse(httpclient.get(httpclient.metrics_url(url)).text)
    except (httpclient.HTTPError, OSError, ValueError):
        return {}


def total(metrics: Metrics, name: str, **match: str) -> float:
    """Sum of `name` over its label sets that carry every `match` label."""
    return sum(v for labels, v in metrics.get(name, []) if all(labels.get(k) == w for k, w in match.items()))


def histogram(metrics: Metrics, name: str) -> dict[str, Any]:
    """sum, count and cumulative buckets [(le, count)] of a histogram (summed over label sets)."""
    buckets: dict[float, float] = {}
    for labels, v in metrics.get(name + "_bucket", []):
        le = float(labels.get("le", "inf").replace("+Inf", "inf"))
        buckets[le] = buckets.get(le, 0.0) + v
    return {"sum": total(metrics, name + "_sum"), "count": total(metrics, name + "_count"),
            "buckets": sorted(buckets.items())}


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> Optional[float]:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the q-th observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le
