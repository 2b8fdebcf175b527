"""`kvbm bench compare [SCENARIO.yaml]`: each engine configuration in turn, one workload, one comparison table.

A scenario (scenarios/*.yaml) names a workload and two or more engine configurations; keys are the flags of
`kvbm serve` and of the workload command, spelled as on the command line without the dashes in front:

  name: prefix-reuse-cpu
  workload: {type: prefix-reuse, prefix-prompt-length: 1536, num-prefix-prompts: 5, ...}
  engine: {kv-cache-memory-bytes: 13631488, ...}          # shared by every configuration
  configs:
    - {name: baseline, connector: none}
    - {name: kvbm, connector: kvbm, cpu-cache-gb: 1}

For each configuration: start the engine (log in OUT/<name>/engine.log), wait for /health, snapshot vLLM's
/metrics, run the workload (OUT/<name>/requests.jsonl, summary.json), snapshot /metrics again
(OUT/<name>/vllm_metrics.json: the deltas), stop the engine's process group. Then OUT/comparison.json and
OUT/comparison.md: TTFT p50/p90, ITL, throughput side by side with ratios against the first configuration.

`instances: 2` starts each configuration as two engines behind one round-robin client (request i goes to engine
i mod 2, so with warm-up requests that compute each prefix, every measured prefix returns on the other engine);
prefix-reuse workload, native driver. A config with `remote: redis` shares G4 between its engines: a fresh
redis-server kvbm starts for it (or the store of `--remote-url`); vLLM's counters are summed over the engines.

`sweep: {concurrency: [1, 8]}` (one workload key, several values) runs the workload once per value on each
engine (started once): results in OUT/<name>/<key>-<value>/, one comparison table per value. Each value draws
its own prompts (random seed + its index), so no value reuses the KV another one left behind.

`repeat: 3` (or --repeat 3) starts every configuration 3 times, interleaved A B, B A, A B, ... so that drift over
time (a CPU engine's speed varies 20-30% between starts) cancels; each start runs the whole sweep. Repeat i's
results and its comparison are in OUT/repeat-<i>/; OUT/comparison.* give per metric the median value of each
config and the median and min-max of the per-repeat gains; comparison.json's "starts" lists the start order.

Operations:
  Scenario / load_scenario(path)      the YAML, validated (one line per mistake)
  default_scenario()                  the CPU prefix-reuse comparison on the embedded model (`make demo`)
  sweep_points(scenario)              (label, workload config) per sweep value; one (None, ...) without a sweep
  run_compare(scenario, out_dir)      run everything (`repeat` times); returns the comparison dict
  combine_repeats(comparisons)        the repeats' medians and ranges, as one comparison
  metrics_delta(before, after)        what a run added to vLLM's counters (kvbm_cli.prom parses them)
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvbm_cli._options import Driver, JsonOpt
from kvbm_cli._output import emit_json, err, markdown, out
from kvbm_cli import prom
from kvbm_cli._data import data_dir
from kvbm_cli._errors import CliError
from kvbm_cli.bench.common import WorkloadConfig, run_workload
from kvbm_cli.bench.hit_rate import HitRateConfig
from kvbm_cli.bench.multi_round import MultiRoundConfig, explain_reuse, reuse_accounting
from kvbm_cli.bench.prefix_reuse import PrefixReuseConfig
from kvbm_cli.collect import background
from kvbm_cli.engine import (Engine, EngineSpec, Launch, build_launch, free_port, kvbm_metrics_on, sigterm_as_exception,
                             start_and_wait)
from kvbm.mechanism.remote import local_server as local_redis
from kvbm_cli.results import read_run

SCENARIO_DIR = data_dir("scenarios")
_VLLM_COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:external_prefix_cache_queries",
                  "vllm:external_prefix_cache_hits", "vllm:prompt_tokens", "vllm:generation_tokens",
                  "vllm:num_preemptions")
_TTFT = "vllm:time_to_first_token_seconds"
_CACHE_COUNTERS = {"g1_hit_tokens": "vllm:prefix_cache_hits", "g1_query_tokens": "vllm:prefix_cache_queries",
                   "kvbm_hit_tokens": "vllm:external_prefix_cache_hits",
                   "kvbm_query_tokens": "vllm:external_prefix_cache_queries"}  # the cache table's columns
_VLLM_HISTOGRAMS = (_TTFT, "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds")


class Scenario(BaseModel):
    """A comparison: one workload, several engine configurations."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    description: str = ""
    workload: dict[str, Any]
    engine: dict[str, Any] = Field(default_factory=dict)
    configs: list[dict[str, Any]]
    driver: Driver = Driver.native
    health_timeout: float = Field(600.0, alias="health-timeout")
    sweep: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    instances: int = Field(1, ge=1, le=8)
    repeat: int = Field(1, ge=1)


def _problem(exc: ValidationError, where: str) -> str:
    """The first mistake pydantic found, as `where.key: what is wrong` (keys spelled as in the file)."""
    e = exc.errors()[0]
    key = ".".join(str(p) for p in (where, *e["loc"]) if p != "")
    return f"{key}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"


def _workload_config(wl: dict[str, Any]) -> WorkloadConfig:
    wl = dict(wl)
    kind = wl.pop("type", None)
    cls = {c.name: c for c in (PrefixReuseConfig, MultiRoundConfig, HitRateConfig)}.get(kind)
    if cls is None:
        raise CliError(f"workload.type: must be prefix-reuse, multi-round or hit-rate, not {kind!r}")
    try:
        cfg = cls.model_validate(wl)
    except ValidationError as exc:
        raise CliError(_problem(exc, "workload")) from None
    cfg.validate()
    return cfg


def engine_spec(shared: dict[str, Any], config: dict[str, Any]) -> tuple[str, EngineSpec]:
    """(config name, EngineSpec) from the shared `engine:` keys overridden by one `configs:` entry."""
    merged = {**shared, **config}
    name = merged.pop("name", None)
    if not name or not re.fullmatch(r"[\w.-]+", str(name)):
        raise CliError(f"every scenario config needs a name of letters, digits, '-', '_' or '.' (got {name!r})")
    remote = merged.pop("remote", None)
    if remote not in (None, "redis"):
        raise CliError(f"configs ({name}).remote: must be redis (a shared store kvbm starts), not {remote!r}")
    if remote and (merged.get("connector") != "kvbm" or merged.get("remote-url")):
        raise CliError(f"configs ({name}).remote: needs connector: kvbm (and a cpu-cache-gb) and no remote-url")
    for key in ("vllm-args", "vllm_args"):
        if key in merged:
            merged[key] = [str(a) for a in merged[key] or []]
    if isinstance(merged.get("env"), dict):
        merged["env"] = {str(k): str(v) for k, v in merged["env"].items()}
    try:
        return str(name), EngineSpec.model_validate(merged)
    except ValidationError as exc:
        raise CliError(_problem(exc, f"configs ({name})")) from None


def load_scenario(path: Path) -> Scenario:
    """Parse and check a scenario file; one CliError (exit 2) naming the file and the first wrong key."""
    if not Path(path).exists() and (SCENARIO_DIR / f"{path}.yaml").is_file():
        path = SCENARIO_DIR / f"{path}.yaml"  # a shipped scenario by name, e.g. prefix-reuse-cpu
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise CliError(f"scenario not found: {path}") from None
    except yaml.YAMLError as exc:
        raise CliError(f"scenario {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise CliError(f"scenario {path} must be a mapping with name, workload, engine and configs")
    try:
        scenario = Scenario.model_validate(raw)
        if len(scenario.configs) < 2:
            raise CliError("needs at least two configs (a baseline and one to compare)")
        sweep_points(scenario)
        names = [engine_spec(scenario.engine, c)[0] for c in scenario.configs]
    except ValidationError as exc:
        raise CliError(f"scenario {path}: {_problem(exc, '')}") from None
    except CliError as exc:
        raise CliError(f"scenario {path}: {exc}") from None
    if len(set(names)) != len(names):
        raise CliError(f"scenario {path}: config names must be unique ({', '.join(names)})")
    if scenario.instances > 1 and (scenario.workload.get("type") != "prefix-reuse" or scenario.driver != Driver.native):
        raise CliError(f"scenario {path}: instances: {scenario.instances} needs a prefix-reuse workload and the "
                       "native driver (its client sends request i to engine i mod instances)")
    return scenario


def sweep_points(scenario: Scenario) -> list[tuple[Optional[str], WorkloadConfig]]:
    """[(label, workload config)]: one per value of the scenario's sweep ("concurrency-8"), or [(None, config)]."""
    if not scenario.sweep:
        return [(None, _workload_config(scenario.workload))]
    if len(scenario.sweep) != 1:
        raise CliError(f"scenario {scenario.name}: sweep takes one workload key, not {len(scenario.sweep)}")
    (key, values), = scenario.sweep.items()  # one value or more: the model's bound
    labels = [f"{key}-{v}" for v in values]
    if len(set(labels)) != len(labels):
        raise CliError(f"scenario {scenario.name}: sweep {key} values must be unique")
    seed = int(scenario.workload.get("random-seed", scenario.workload.get("random_seed", 0)))
    # each value draws its own prompts: a later point must not hit the KV an earlier one left in the caches
    return [(label, _workload_config({**scenario.workload, key: v, "random-seed": seed + i}))
            for i, (label, v) in enumerate(zip(labels, values))]


def default_scenario() -> Path:
    """The shipped scenarios/prefix-reuse-cpu.yaml."""
    return SCENARIO_DIR / "prefix-reuse-cpu.yaml"


# --- vLLM's /metrics ---------------------------------------------------------------------------------------

def metrics_delta(before: dict, after: dict) -> dict[str, Any]:
    """What the run added to vLLM's counters, and its TTFT histogram (sum, count, bucket-estimated quantiles)."""
    def added(name: str, **match: str) -> float:
        return prom.total(after, name, **match) - prom.total(before, name, **match)

    d: dict[str, Any] = {name: added(name + "_total") for name in _VLLM_COUNTERS}
    d |= {f"vllm:prompt_tokens_cached_by_source{{{s}}}": added("vllm:prompt_tokens_cached_by_source_total", source=s)
          for s in ("device", "host", "disk", "external_unspecified")}
    d["kvbm"] = kvbm = {}
    for name, values in after.items():
        if name.startswith("vllm:kvbm_") and name.endswith("_total"):
            for labels, v in values:
                tag = ",".join(f"{k}={w}" for k, w in sorted(labels.items()) if k not in ("engine", "model_name"))
                prev = sum(bv for bl, bv in before.get(name, []) if bl == labels)
                kvbm[f"{name}{{{tag}}}"] = v - prev
    for name in _VLLM_HISTOGRAMS:
        b, a = prom.histogram(before, name), prom.histogram(after, name)
        n = a["count"] - b["count"]
        d[name] = {"sum": a["sum"] - b["sum"], "count": n, "mean": (a["sum"] - b["sum"]) / n if n else None}
    before_buckets = dict(prom.histogram(before, _TTFT)["buckets"])
    buckets = [(le, c - before_buckets.get(le, 0.0)) for le, c in prom.histogram(after, _TTFT)["buckets"]]
    d[_TTFT] |= {f"p{round(q * 100)}": prom.histogram_quantile(q, buckets) for q in (0.5, 0.9, 0.99)}
    d[_TTFT]["buckets"] = [[le if not math.isinf(le) else "+Inf", c] for le, c in buckets]
    return d


# --- the comparison ----------------------------------------------------------------------------------------

def _server_mean(name: str):
    return lambda r: (r["vllm_metrics"].get(name) or {}).get("mean")


_ROWS = [  # label, getter of one config's results ({"summary", "vllm_metrics"}), better, scale
    ("TTFT p50 (ms)", lambda r: r["summary"].ttft_s.p50, "lower", 1000),
    ("TTFT p90 (ms)", lambda r: r["summary"].ttft_s.p90, "lower", 1000),
    ("TTFT mean (ms)", lambda r: r["summary"].ttft_s.mean, "lower", 1000),
    ("ITL mean (ms)", lambda r: r["summary"].itl_s.mean, "lower", 1000),
    ("E2E p50 (ms)", lambda r: r["summary"].e2e_s.p50, "lower", 1000),
    ("output tokens/s", lambda r: r["summary"].output_tokens_per_s, "higher", 1),
    ("requests/s", lambda r: r["summary"].requests_per_s, "higher", 1),
    # the server's own view, which a client starved of CPU cannot skew
    ("vLLM ITL mean (ms)", _server_mean("vllm:inter_token_latency_seconds"), "lower", 1000),
    ("vLLM E2E mean (ms)", _server_mean("vllm:e2e_request_latency_seconds"), "lower", 1000),
]


def build_comparison(scenario: Scenario, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rows of values per config and gains against the first config (>1 is better: faster or more); a row no
    config has a value for is left out."""
    names = list(results)
    base = names[0]
    rows = []
    for label, get, better, scale in _ROWS:
        values = {n: None if get(results[n]) is None else get(results[n]) * scale for n in names}
        if all(v is None for v in values.values()):
            continue
        gains = {n: None if not values[base] or not values[n] else
                 (values[base] / values[n] if better == "lower" else values[n] / values[base]) for n in names[1:]}
        rows.append({"metric": label, "better": better, "values": values, "gain_vs_" + base: gains})
    cache = [{"config": n, "errors": results[n]["summary"].num_errors, "requests": results[n]["summary"].num_requests,
              **{key: m.get(counter) or 0 for key, counter in _CACHE_COUNTERS.items()},
              "vllm_ttft": m.get(_TTFT), "reuse": m.get("reuse"), "itl_ms": _itl_ms(results[n])}
             for n in names for m in [results[n]["vllm_metrics"]]]
    return {"scenario": scenario.name, "baseline": base, "configs": names, "rows": rows, "cache": cache}


def _itl_ms(result: dict[str, Any]) -> Optional[list[float]]:
    """[client ITL mean, vLLM's ITL mean] in ms, when both were measured."""
    client, server = result["summary"].itl_s.mean, _server_mean("vllm:inter_token_latency_seconds")(result)
    return [client * 1000, server * 1000] if client is not None and server else None


def _burst_note(c: dict[str, Any]) -> Optional[str]:
    """A config whose client saw tokens far closer together than the engine made them got them in bursts: its
    API server fell behind (on a few shared cores, vLLM's busy-waiting engine core starves it), so its client-side
    latencies and concurrent throughput measure that, not the engine (README "Why the client's figures split")."""
    client, server = c.get("itl_ms") or (None, None)
    if client is None or client >= 0.5 * server:
        return None
    return (f"\n- {c['config']}: tokens reached the client in bursts (client ITL mean {client:.2f} ms against the "
            f"engine's {server:.2f} ms): its API server fell behind, so read the vLLM rows for this config")


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}")


def comparison_markdown(comp: dict[str, Any]) -> str:
    """The comparison table (values and gains against the first config) and the cache table, in Markdown."""
    names, base = comp["configs"], comp["baseline"]
    ms = lambda x: "-" if x is None else f"{x * 1000:.1f}"  # noqa: E731
    span = lambda r, n: f" ({r[n][0]:.2f}-{r[n][1]:.2f})" if r and r.get(n) else ""  # noqa: E731
    rows = [[row["metric"], *[_fmt(row["values"][n]) for n in names],
             *[("-" if row["gain_vs_" + base][n] is None else f"{row['gain_vs_' + base][n]:.2f}x")
               + span(row.get("gain_range"), n) for n in names[1:]]]
            for row in comp["rows"]]
    cache = [[c["config"], c["requests"], c["errors"], f"{c['g1_hit_tokens']:.0f} / {c['g1_query_tokens']:.0f}",
              f"{c['kvbm_hit_tokens']:.0f} / {c['kvbm_query_tokens']:.0f}",
              f"{t.get('count', 0):.0f}, {ms(t.get('mean'))}, {ms(t.get('p50'))}, {ms(t.get('p90'))}"]
             for c in comp["cache"] for t in [c["vllm_ttft"] or {}]]
    return "\n".join([
        markdown(["metric", *names, *[f"{n} vs {base}" for n in names[1:]]], rows), "",
        "Gains are baseline/config for latencies and config/baseline for throughputs: above 1 is better."
        + (f" Median of {comp['repeats']} interleaved repeats (values, and gains with their min-max)."
           if comp.get("repeats") else ""), "",
        markdown(["config", "requests", "errors", "G1 hit tokens / queried", "KVBM hit tokens / queried",
                  "vLLM TTFT histogram: count, mean, ~p50, ~p90 (ms)"], cache),
        *[f"\n- {c['config']}: {explain_reuse(c['reuse'])}" for c in comp["cache"] if c.get("reuse")],
        *filter(None, map(_burst_note, comp["cache"]))]) + "\n"


def _median(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def combine_repeats(comps: list[dict[str, Any]]) -> dict[str, Any]:
    """One comparison from the repeats' (sweep points alike): median values, median gains with their min-max."""
    first = comps[0]
    if "points" in first:
        return {**first, "points": [combine_repeats([c["points"][j] for c in comps])
                                    for j in range(len(first["points"]))]}
    key = "gain_vs_" + first["baseline"]
    rows = []
    for row in first["rows"]:
        reps = [r for c in comps for r in c["rows"] if r["metric"] == row["metric"]]
        gains = {n: [r[key][n] for r in reps if r[key][n] is not None] for n in row[key]}
        rows.append({**row, "values": {n: _median([r["values"][n] for r in reps]) for n in row["values"]},
                     key: {n: _median(g) for n, g in gains.items()},
                     "gain_range": {n: [min(g), max(g)] if g else None for n, g in gains.items()}})
    return {**first, "repeats": len(comps), "rows": rows,
            "cache": [{**c, "config": f"{c['config']} #{i}"} for i, comp in enumerate(comps, 1) for c in comp["cache"]]}


def _instance(spec: EngineSpec, i: int, port: Optional[int]) -> tuple[Launch, list[str]]:
    """Engine `i` of a configuration: its Launch and the metrics sources (vLLM's, and KVBM's own when on)."""
    spec = spec.model_copy(deep=True)
    spec.port = port + i if port else free_port()
    spec.host = spec.host or "127.0.0.1"
    sources = []
    if spec.connector == "kvbm":  # KVBM's own metrics too, recorded beside the results
        sources.append(kvbm_metrics_on(spec, int((i == 0 and spec.env.get("DYN_KVBM_METRICS_PORT")) or 0)))
    launch = build_launch(spec)
    return launch, [launch.url, *sources]


def run_compare(scenario: Scenario, out_dir: Path, *, port: Optional[int] = None, remote_url: Optional[str] = None,
                show_progress: bool = True, repeat: Optional[int] = None) -> dict:
    """Launch, measure and stop each configuration in turn (`repeat` times, interleaved A B B A ...); write
    per-config results and the comparison."""
    points = sweep_points(scenario)
    if any(c.get("remote") for c in scenario.configs) and not remote_url and not local_redis.available():
        raise CliError("remote: redis needs redis-server and redis-cli on PATH (`make redis`, or apt-get install "
                       "redis-server), or give a store with --remote-url")
    n = repeat or scenario.repeat
    names = [engine_spec(scenario.engine, raw)[0] for raw in scenario.configs]
    results: list[dict] = [{label: {} for label, _ in points} for _ in range(n)]
    starts = []
    for r in range(n):  # A B, B A, A B, ...: drift over time cancels out of the medians
        for i in (range(len(names)) if r % 2 == 0 else reversed(range(len(names)))):
            run_dir = (out_dir if n == 1 else out_dir / f"repeat-{r + 1}") / names[i]
            starts.append(str(run_dir.relative_to(out_dir)))
            for label, res in _run_config(scenario, scenario.configs[i], points, run_dir, port, remote_url,
                                          show_progress).items():
                results[r][label][names[i]] = res
    comps = [_comparison(scenario, points, {label: {m: res[label][m] for m in names} for label in res})
             for res in results]
    for r, comp in enumerate(comps if n > 1 else [], 1):
        _write(out_dir / f"repeat-{r}", comp)
    comp = {**(combine_repeats(comps) if n > 1 else comps[0]), "starts": starts}
    _write(out_dir, comp)
    return comp


def _run_config(scenario: Scenario, raw: dict[str, Any], points: list, run_dir: Path, port: Optional[int],
                remote_url: Optional[str], show_progress: bool) -> dict[Optional[str], dict[str, Any]]:
    """Start one configuration's engine(s), run every sweep point, stop them: {label: results}."""
    name, spec = engine_spec(scenario.engine, raw)
    run_dir.mkdir(parents=True, exist_ok=True)
    console = err()
    results = {}
    with contextlib.ExitStack() as stack:
        if raw.get("remote"):  # a fresh store per configuration: nothing left from an earlier one
            spec.remote_url = remote_url or stack.enter_context(local_redis.RedisServer()).url
        launches, sources, engines = [], [], []
        for i in range(scenario.instances):
            launch, srcs = _instance(spec, i, port)
            launches.append(launch)
            sources += srcs
            log = run_dir / ("engine.log" if i == 0 else f"engine-{i}.log")
            log.write_text("")
            for note in launch.notes if i == 0 else []:
                console.print(f"note ({name}): {note}", markup=False)
            console.print(f"[{name}] {launch.shell()}", markup=False, soft_wrap=True)
            engines.append(Engine(launch, log_path=log))
            stack.callback(engines[-1].stop)
        try:
            for engine in engines[1:]:  # started together; the first one shows the spinner
                engine.start()
            took = start_and_wait(engines[0], scenario.health_timeout, f"{name}: vLLM ({spec.connector})")
            took = max([took] + [e.wait_healthy(scenario.health_timeout) for e in engines[1:]])
            console.print(f"[{name}] {len(engines)} engine(s) healthy after {took:.0f} s", markup=False)
            for label, wl in points:
                point_dir = run_dir if label is None else run_dir / label
                point_dir.mkdir(parents=True, exist_ok=True)
                tag = name if label is None else f"{name} {label}"
                console.print(f"[{tag}] running {scenario.workload['type']}", markup=False)
                results[label] = _run_point(scenario, wl, launches, sources, point_dir, name, show_progress)
                summary = results[label]["summary"]
                console.print(f"[{tag}] done: TTFT p50 {_fmt((summary.ttft_s.p50 or 0) * 1000)} ms, "
                              f"{_fmt(summary.output_tokens_per_s)} output tokens/s, {summary.num_errors} errors",
                              markup=False)
        except BaseException:
            console.print(f"[{name}] engine log: {run_dir / 'engine.log'}", markup=False)
            raise
    return results


def _comparison(scenario: Scenario, points: list, results: dict) -> dict[str, Any]:
    """One run's comparison: one table, or one per sweep value."""
    if not scenario.sweep:
        return build_comparison(scenario, results[None])
    (key, values), = scenario.sweep.items()
    return {"scenario": scenario.name, "sweep": {"key": key, "values": values},
            "points": [{"label": label, "value": v, **build_comparison(scenario, results[label])}
                       for (label, _), v in zip(points, values)]}


def _write(out_dir: Path, comp: dict[str, Any]) -> None:
    (out_dir / "comparison.json").write_text(json.dumps(comp, indent=2) + "\n")
    (out_dir / "comparison.md").write_text(comparison_text(comp))


def comparison_text(comp: dict[str, Any]) -> str:
    """comparison.md of a run_compare result (one table, or one per sweep value)."""
    if "points" not in comp:
        return comparison_markdown(comp)
    key = comp["sweep"]["key"]
    return "\n".join(f"### {key} = {p['value']}\n\n{comparison_markdown(p)}" for p in comp["points"])


def _scrape(launches: list[Launch]) -> prom.Metrics:
    """vLLM's /metrics of every engine of a configuration, samples with the same labels summed."""
    summed: dict[str, Counter] = defaultdict(Counter)
    for launch in launches:
        for name, samples in prom.scrape(launch.url).items():
            for labels, v in samples:
                summed[name][tuple(sorted(labels.items()))] += v
    return {name: [(dict(k), v) for k, v in samples.items()] for name, samples in summed.items()}


def _run_point(scenario: Scenario, wl: WorkloadConfig, launches: list[Launch],
               sources: list[str], run_dir: Path, name: str, show_progress: bool) -> dict[str, Any]:
    """One workload run on running engines (a round-robin client over several): results in run_dir;
    {"summary", "vllm_metrics"}."""
    launch = launches[0]
    before = _scrape(launches)
    engine = launch.engine_info() | ({"instances": [x.url for x in launches]} if len(launches) > 1 else {})
    with background(sources, run_dir / "metrics.csv"):  # vLLM's and KVBM's series, for kvbm report
        summary = run_workload(wl, url=",".join(x.url for x in launches), model=None, tokenizer=None,
                               artifact_dir=run_dir, run=name, engine=engine, show_progress=show_progress,
                               driver=scenario.driver.value)
    delta = metrics_delta(before, _scrape(launches))
    if isinstance(wl, MultiRoundConfig):  # which queried tokens could have been in a cache at all
        block = int(launch.spec.block_size or 128)
        delta["reuse"] = reuse_accounting(read_run(run_dir)[0], wl.shared_system_prompt, block,
                                          delta["vllm:prefix_cache_hits"], delta["vllm:external_prefix_cache_hits"])
    (run_dir / "vllm_metrics.json").write_text(json.dumps(delta, indent=2) + "\n")
    return {"summary": summary, "vllm_metrics": delta}


def compare(
    scenario_path: Annotated[Optional[Path], typer.Argument(
        metavar="[SCENARIO]", help="Scenario YAML, or the name of a shipped one (prefix-reuse-cpu, no-reuse-cpu, multi-round-cpu, ...). Default: the CPU prefix-reuse comparison on "
                                   "the embedded model.", dir_okay=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Results directory. Default: "
                                                                 "runs/compare-<scenario name>.", file_okay=False)] = None,
    port: Annotated[Optional[int], typer.Option(help="Engine port (default: a free one; the next ones for more "
                                                     "instances).")] = None,
    remote_url: Annotated[Optional[str], typer.Option(help="The store of `remote: redis` configs (default: a "
                                                           "fresh local redis-server each); never emptied by kvbm.")] = None,
    repeat: Annotated[Optional[int], typer.Option(help="Start each configuration this many times, interleaved "
                                                       "A B B A ...; the table gives medians (default: the "
                                                       "scenario's repeat, 1).", min=1)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Launch each engine configuration of a scenario in turn, run its workload, compare them side by side."""
    path = scenario_path or default_scenario()
    scenario = load_scenario(path)
    out_dir = out_dir or Path("runs") / f"compare-{scenario.name}"
    with sigterm_as_exception():
        comp = run_compare(scenario, out_dir, port=port, remote_url=remote_url, show_progress=not json_out,
                           repeat=repeat)
    if json_out:
        emit_json(comp)
        return
    console = out()
    console.print(f"scenario {scenario.name} ({path}) · results in {out_dir}", markup=False, soft_wrap=True)
    console.print(comparison_text(comp), markup=False, soft_wrap=True, highlight=False)
