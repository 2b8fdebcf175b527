"""`kvbm bench hit-rate` without an engine: argument errors, the request plan, the scenario, the plot.
(tests/test_bench_engine.py runs it against a real vLLM CPU server.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvbm_cli.bench.compare import load_scenario, sweep_points
from kvbm_cli.bench.hit_rate import HitRateConfig, make_requests
from kvbm_cli.plots import throughput_points, throughput_vs_hit_rate
from kvbm_cli.bench.prompts import PromptTokenizer
from kvbm_runner import run_kvbm


def _one_line(outcome, *needles: str) -> None:
    assert outcome.exit_code == 2, (outcome.stdout, outcome.stderr)
    assert "Traceback" not in outcome.stderr
    lines = [ln for ln in outcome.stderr.splitlines() if ln.startswith("kvbm:")]
    assert len(lines) == 1, outcome.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args, needles", [
    (["--hit-rate", "1.5"], ["--hit-rate", "between 0 and 1"]),
    (["--hit-rate", "-0.1"], ["--hit-rate"]),
    (["--prefix-tokens", "512", "--input-tokens", "512"], ["--input-tokens", "--prefix-tokens"]),
    (["--concurrency", "0"], ["--concurrency"]),
    (["--flush-request-count", "-1"], ["--flush-request-count"]),
    (["--endpoint-type", "grpc"], ["grpc"]),
])
def test_bad_arguments_are_one_line_before_any_request(args, needles):
    # the URL points nowhere: the error must come from the arguments, before the server is asked anything
    _one_line(run_kvbm("bench", "hit-rate", "--url", "http://127.0.0.1:9", *args), *needles)


def test_an_unreachable_server_is_one_line():
    o = run_kvbm("bench", "hit-rate", "--url", "http://127.0.0.1:9", "--request-count", "2")
    assert o.exit_code != 0 and "Traceback" not in o.stderr and "127.0.0.1:9" in o.stderr


@pytest.mark.parametrize("rate, hits", [(0.0, 0), (0.5, 10), (0.8, 16), (1.0, 20)])
def test_plan_primes_each_reused_prefix_once_then_flushes(tiny_model_dir, rate, hits):
    tok = PromptTokenizer(str(tiny_model_dir))
    cfg = HitRateConfig(prefix_tokens=256, input_tokens=300, output_tokens=4, hit_rate=rate, request_count=20,
                        concurrency=4, flush_request_count=3)
    specs = make_requests(cfg, tok)
    prime = [s for s in specs if s.request_id.startswith("prime-")]
    flush = [s for s in specs if s.request_id.startswith("flush-")]
    measured = [s for s in specs if not s.warmup]
    assert specs == prime + flush + measured and all(s.warmup for s in prime + flush)
    assert len(prime) == hits and len(flush) == 3 and len(measured) == 20
    reused = [s for s in measured if s.prefix_id is not None]
    assert len(reused) == hits and sorted(s.prefix_id for s in reused) == list(range(hits))  # each once
    ids = lambda s: tok.tok.encode(tok._render(s.prompt), add_special_tokens=False).ids  # noqa: E731
    for s in reused:  # a hit's first 256 tokens (2 blocks) are its primed prefix's; nobody else's are
        p = prime[s.prefix_id]
        assert len(ids(p)) == 256 + tok.head_tail("chat")[1] + 8
        assert ids(s)[:256] == ids(p)[:256] and ids(s)[256:] != ids(p)[256:len(ids(s))]
        assert not any(ids(o)[:128] == ids(s)[:128] for o in measured + flush if o is not s)
    for s in measured + flush:
        assert tok.count("chat", s.prompt) == 300 == s.expected_input_tokens
    assert [s.max_tokens for s in measured] == [4] * 20 and all(s.max_tokens == 1 for s in prime + flush)
    assert make_requests(cfg, tok) == specs  # deterministic for a seed


def test_shipped_scenario_sweeps_the_hit_rate():
    points = sweep_points(load_scenario("hit-rate-cpu"))
    assert [label for label, _ in points] == ["hit-rate-0.0", "hit-rate-0.5", "hit-rate-0.8"]
    assert [c.hits for _, c in points] == [0, 128, 205] and len({c.random_seed for _, c in points}) == 3


def test_plot_of_throughput_against_hit_rate(tmp_path):
    def summary(run, rate, rps):
        return {"workload": "hit-rate", "run": run, "requests_per_s": rps, "config": {"hit_rate": rate}}

    runs = [summary("baseline", 0.8, 2.0), summary("baseline", 0.0, 1.0), summary("kvbm", 0.0, 1.0),
            summary("kvbm", 0.8, 3.0), {"workload": "prefix-reuse", "run": "other", "requests_per_s": 9.0}]
    assert throughput_points(runs) == {"baseline": [(0.0, 1.0), (0.8, 2.0)], "kvbm": [(0.0, 1.0), (0.8, 3.0)]}
    png = throughput_vs_hit_rate([SimpleNamespace(summary=s) for s in runs], tmp_path / "hit_rate.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert throughput_vs_hit_rate([SimpleNamespace(summary=runs[-1])], tmp_path / "none.png") is None
