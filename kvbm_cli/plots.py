"""The figures of `kvbm report` (matplotlib, Agg): one PNG per function, each comparing the runs side by side.

Operations:
  ttft_cdf, ttft_over_time, itl, throughput   from each run's requests
  hit_rates, tier_traffic                     from each run's metrics.csv (None when no run has one)
  PLOTS                                       (title, file name, function) in the order the report shows them
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from kvbm_cli.results import HIT_COUNTERS, HIT_GAUGES, TIER_PAIRS, Run, series


def _axes(width: float = 8, height: float = 4.2, **subplots):
    """The axes of a figure outside pyplot: no backend to pick, nothing to close."""
    from matplotlib.figure import Figure  # here: matplotlib is slow to import and only reports need it

    return Figure(figsize=(width, height)).subplots(**subplots)


def _save(ax, path: Path, title: str, xlabel: str, ylabel: str, **legend) -> Path:
    """Label `ax`, draw its grid and legend, write its figure to `path`."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(**legend)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=110)
    return path


def _log_if_wide(ax, values: pd.Series, axis: str = "x") -> None:
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) and values.max() / values.min() > 20:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _cdf(runs: list[Run], path: Path, seconds: Callable[[Run], list], title: str, xlabel: str, ylabel: str) -> Path:
    """One step curve per run of the values (in seconds) `seconds(run)` gives, drawn in ms."""
    ax = _axes(7)
    samples = [np.asarray(seconds(run), dtype=float) * 1000 for run in runs]
    for i, (run, values) in enumerate(zip(runs, samples)):
        values = values[np.isfinite(values)]
        if len(values):
            ax.ecdf(values, color=f"C{i}", label=f"{run.name} (p50 {np.median(values):.1f} ms, n={len(values)})")
    _log_if_wide(ax, pd.Series(np.concatenate(samples)))
    return _save(ax, path, title, xlabel, ylabel, loc="lower right")


def ttft_cdf(runs: list[Run], path: Path) -> Path:
    """The distribution of time to first token, one step curve per run."""
    return _cdf(runs, path, lambda run: run.requests["ttft_s"], "TTFT CDF", "time to first token (ms)",
                "fraction of requests")


def ttft_over_time(runs: list[Run], path: Path) -> Path:
    """TTFT of each request against its start time."""
    ax = _axes()
    for i, run in enumerate(runs):
        frame = run.requests.dropna(subset=["ttft_s"]).sort_values("start_s")
        if len(frame):
            t = frame["start_s"].astype(float) - float(frame["start_s"].min())
            ax.plot(t, frame["ttft_s"].astype(float) * 1000, marker="o", markersize=3, linewidth=1, color=f"C{i}",
                    label=run.name)
    _log_if_wide(ax, pd.concat([r.requests["ttft_s"] for r in runs]).astype(float), axis="y")
    return _save(ax, path, "TTFT per request over time (spikes: prefixes recomputed)",
                 "request start (s since the first measured request)", "TTFT (ms)")


def itl(runs: list[Run], path: Path) -> Path:
    """The distribution of inter-token latencies over all output tokens."""
    return _cdf(runs, path, lambda run: [v for lst in run.requests["itl_s"] for v in lst],
                "ITL CDF (all output tokens)", "inter-token latency (ms)", "fraction of tokens")


def throughput(runs: list[Run], path: Path) -> Path:
    """Output tokens per second of completed requests, in about 30 time bins."""
    ax = _axes()
    for i, run in enumerate(runs):
        frame = run.requests.dropna(subset=["start_s", "e2e_s", "output_tokens"])
        if frame.empty:
            continue
        t0 = float(frame["start_s"].min())
        done = frame["start_s"].astype(float) + frame["e2e_s"].astype(float) - t0
        span = max(float(done.max()), 1e-3)
        width = max(span / 30.0, 1.0)
        edges = np.arange(0.0, span + width, width)
        tokens, _ = np.histogram(done, bins=edges, weights=frame["output_tokens"].astype(float))
        ax.step(edges[:-1], tokens / width, where="post", color=f"C{i}",
                label=f"{run.name} ({frame['output_tokens'].sum() / span:,.1f} tok/s overall)")
    return _save(ax, path, "Output throughput over time", "time (s since the first measured request)",
                 "output tokens/s (completed)")


def hit_rates(runs: list[Run], path: Path) -> Path | None:
    """vLLM's prefix-cache hit rates (from its counters) and KVBM's windowed tier hit rates over time."""
    ax = _axes()
    styles = ["-", "--", ":", "-."]
    drawn = 0
    for c, run in enumerate(runs):  # a run without metrics.csv has empty series
        curves = []
        for i, ((hits, queries), label) in enumerate(HIT_COUNTERS.items()):
            h, q = series(run, hits), series(run, queries)
            if len(h) and len(q):  # hits per query since the first scrape, once any query was made
                curves.append((((h - h.iloc[0]) / (q - q.iloc[0]).where(q > q.iloc[0])).dropna(), label, styles[i]))
        for i, (gauge, label) in enumerate(HIT_GAUGES.items()):
            curves.append((series(run, gauge), label, styles[2 + i]))
        for values, label, style in curves:
            if len(values):
                ax.plot(values.index, values.values, linestyle=style, color=f"C{c}", label=f"{run.name}: {label}")
                drawn += 1
    if not drawn:
        return None
    ax.set_ylim(-0.02, 1.02)
    return _save(ax, path, "Cache hit rates (vLLM prefix cache, KVBM tiers)",
                 "time (s since metrics collection started)", "hit rate", fontsize=7)


def tier_traffic(runs: list[Run], path: Path) -> Path | None:
    """KVBM's cumulative blocks moved per tier pair, one panel per run that has them."""
    with_kvbm = [r for r in runs if r.metrics is not None and (r.metrics["name"].isin(list(TIER_PAIRS))).any()]
    if not with_kvbm:
        return None
    axes = _axes(8, 3.0 * len(with_kvbm) + 0.6, nrows=len(with_kvbm), squeeze=False, sharex=True)
    for ax, run in zip(axes[:, 0], with_kvbm):
        for i, (name, label) in enumerate(TIER_PAIRS.items()):
            values = series(run, name)
            if len(values):
                ax.plot(values.index, values.values - values.iloc[0], color=f"C{i}", label=label,
                        linestyle="-" if name.startswith("kvbm_offload") else "--")
        ax.set(title=f"{run.name}: KVBM blocks moved per tier", ylabel="blocks (cumulative)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    return _save(axes[-1, 0], path, axes[-1, 0].get_title(), "time (s since metrics collection started)",
                 "blocks (cumulative)", fontsize=7, loc="upper left")


def throughput_points(summaries: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """{config (run name): [(hit rate, requests/s)] sorted by hit rate} from hit-rate run summaries."""
    points: dict[str, list[tuple[float, float]]] = {}
    for s in summaries:
        if s.get("workload") == "hit-rate" and s.get("requests_per_s") is not None:
            point = (float(s["config"]["hit_rate"]), float(s["requests_per_s"]))
            points.setdefault(str(s.get("run")), []).append(point)
    return {name: sorted(p) for name, p in points.items()}


def throughput_vs_hit_rate(runs: list[Run], path: Path) -> Path | None:
    """requests/s against the hit rate, one line per configuration (the first is the baseline: ratios in the
    labels); None when no `kvbm bench hit-rate` run is among them."""
    points = throughput_points([r.summary for r in runs])
    if not points:
        return None
    ax = _axes()
    base = dict(next(iter(points.values())))
    for name, pts in points.items():
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        ax.plot(xs, ys, marker="o", label=name)
        for x, y in pts:
            if base.get(x) and name != next(iter(points)):
                ax.annotate(f"{y / base[x]:.2f}x", (x, y), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=8)
    ax.set_ylim(bottom=0)
    return _save(ax, path, "Throughput against the hit rate (ratios: against the first configuration)",
                 "share of requests whose prefix was computed earlier and evicted from G1", "requests/s")


PLOTS = (("TTFT CDF", "ttft_cdf.png", ttft_cdf),
         ("TTFT per request over time", "ttft_over_time.png", ttft_over_time),
         ("Inter-token latency", "itl.png", itl),
         ("Throughput", "throughput.png", throughput),
         ("Hit rates", "hit_rates.png", hit_rates),
         ("Traffic per tier", "tier_traffic.png", tier_traffic),
         ("Throughput against the hit rate", "hit_rate.png", throughput_vs_hit_rate))
