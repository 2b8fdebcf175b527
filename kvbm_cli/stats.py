"""Statistics for reports and gates (numpy, scipy): quantiles, ECDFs and bootstrap confidence intervals of ratios.

Operations:
  hd_weights(n, p)                  Harrell-Davis weights (scipy.special.betainc): the p-quantile as a weighted
                                    sum of order statistics; quantile() equals scipy.stats.mstats.hdquantiles
  quantile(x, p, method=)           one quantile ("hd" Harrell-Davis, or "sample" as numpy computes it)
  summary(x)                        mean, p50, p90, p99, min, max, n of a sample
  bootstrap_ratio(a, b, stat, ...)  stat(b) / stat(a) with a percentile bootstrap interval (scipy.stats.bootstrap)
  Statistic                         what to compute on one sample: a quantile, the mean, or a ratio of sums

Harrell-Davis averages neighbouring order statistics, so at n=30 it spreads much less than the sample median
and a gate tells a 10% regression from noise with fewer requests. The bootstrap resamples each run on its own
(runs are separate experiments) and is seeded: the same inputs always give the same interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy.special import betainc
from scipy.stats import bootstrap


@lru_cache(maxsize=256)
def hd_weights(n: int, p: float) -> np.ndarray:
    """Harrell-Davis weights for the p-quantile of n sorted values (they sum to 1; read-only, they are cached)."""
    weights = np.diff(betainc(p * (n + 1), (1.0 - p) * (n + 1), np.arange(n + 1) / n))  # regularized incomplete beta
    weights.flags.writeable = False
    return weights


def quantile(x, p: float, method: str = "hd") -> float:
    """The p-quantile of `x`: Harrell-Davis ("hd", the default) or numpy's linear interpolation ("sample")."""
    arr = np.asarray(x, dtype=float)
    if arr.size == 0:
        return float("nan")
    return float(np.quantile(arr, p)) if method == "sample" else Statistic("quantile", p)(arr)


def summary(x) -> dict[str, float]:
    """mean, p50, p90, p99 (numpy's sample quantiles, as the bench summary reports them), min, max, n."""
    arr = np.asarray(x, dtype=float)
    n = int(np.isfinite(arr).sum())
    arr = arr[np.isfinite(arr)] if n else np.full(1, np.nan)  # no values: every statistic NaN
    q = np.quantile(arr, [0.5, 0.9, 0.99])
    return {"n": n, "mean": float(arr.mean()), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "min": float(arr.min()), "max": float(arr.max())}


@dataclass(frozen=True)
class Statistic:
    """What to compute on one sample.

    kind "quantile" (with `p`, Harrell-Davis), "mean", or "ratio_of_sums" (sample rows are (numerator,
    denominator) pairs: e.g. output tokens and seconds, giving tokens per second over all requests).
    """

    kind: Literal["quantile", "mean", "ratio_of_sums"]
    p: float = 0.5

    def __call__(self, sample: np.ndarray) -> float:
        return float(self.batch(np.moveaxis(np.asarray(sample, dtype=float), 0, -1)[..., None, :])[0])

    def batch(self, samples: np.ndarray) -> np.ndarray:
        """The statistic of each row of `samples`: shape (B, n), or (2, B, n) for ratio_of_sums (scipy's layout)."""
        if self.kind == "quantile":
            return np.sort(samples, axis=-1) @ hd_weights(samples.shape[-1], self.p)
        if self.kind == "mean":
            return samples.mean(axis=-1)
        return samples[0].sum(axis=-1) / samples[1].sum(axis=-1)  # ratio_of_sums


@dataclass(frozen=True)
class RatioCI:
    """stat(b) / stat(a), the bootstrap interval around it, and the two statistics."""

    ratio: float
    low: float
    high: float
    stat_a: float
    stat_b: float
    n_a: int
    n_b: int
    confidence: float


def bootstrap_ratio(a, b, stat: Statistic, *, n_boot: int = 2000, confidence: float = 0.95,
                    seed: int = 0) -> RatioCI:
    """stat(b) / stat(a) and its percentile bootstrap interval (scipy.stats.bootstrap), resampling a and b
    independently; `a` and `b` are 1-D samples (or (n, 2) pairs for ratio_of_sums). Deterministic for a `seed`."""
    arr_a, arr_b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    stat_a, stat_b = stat(arr_a), stat(arr_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        ci = bootstrap((arr_a, arr_b), lambda x, y, axis: stat.batch(y) / stat.batch(x), n_resamples=n_boot,
                       batch=max(1, 2_000_000 // max(len(arr_a), len(arr_b))),  # bounds the memory
                       confidence_level=confidence, method="percentile", axis=0, rng=seed).confidence_interval
        ratio = float(np.float64(stat_b) / np.float64(stat_a))
    return RatioCI(ratio, float(ci.low), float(ci.high), stat_a, stat_b, len(arr_a), len(arr_b), confidence)
