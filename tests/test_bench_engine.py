"""The bench client against a real vLLM CPU server (the tiny model, no KVBM): exact prompt lengths as the server
counts them, TTFT and inter-token latencies present, result files in the schema, errors that name the problem."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request

import pytest

from kvbm_cli.prom import parse as parse_prometheus
from kvbm_cli.results import read_run
from kvbm_runner import run_kvbm
from vllm_server import vllm_server

pytestmark = pytest.mark.engine

REQUEST_FIELDS = {"request_id", "run", "workload", "start_s", "ttft_s", "itl_s", "e2e_s", "input_tokens",
                  "output_tokens", "prefix_id", "user_id", "round", "warmup", "error"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with vllm_server(tiny_model_dir, ["--seed", "0"], max_model_len=4096) as url:
        yield url


def _ttft_count(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        m = parse_prometheus(resp.read().decode())
    return sum(v for _, v in m.get("vllm:time_to_first_token_seconds_count", []))


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_prefix_reuse_prompts_are_exact_in_server_tokens(server, tmp_path, endpoint):
    before = _ttft_count(server)
    o = run_kvbm("bench", "prefix-reuse", "--url", server, "--prefix-prompt-length", "384", "--num-prefix-prompts",
                 "2", "--synthetic-input-tokens-mean", "100", "--synthetic-input-tokens-stddev", "20",
                 "--output-tokens-mean", "12", "--request-count", "6", "--warmup-request-count", "1",
                 "--concurrency", "2", "--endpoint-type", endpoint, "--artifact-dir", str(tmp_path / endpoint),
                 "--json")
    assert o.exit_code == 0, o.stderr
    assert "not the requested length" not in o.stderr
    records, summary = read_run(tmp_path / endpoint)
    raw = [json.loads(line) for line in (tmp_path / endpoint / "requests.jsonl").read_text().splitlines()]
    assert all(set(r) == REQUEST_FIELDS for r in raw) and len(raw) == 7
    assert [r.warmup for r in records].count(True) == 1
    lengths = set()
    for r in records:
        assert r.error is None and r.run == endpoint and r.workload == "prefix-reuse"
        assert r.output_tokens == 12 and len(r.itl_s) >= 1 and 0 < r.ttft_s < r.e2e_s
        assert r.prefix_id in (0, 1)
        lengths.add(r.input_tokens)
    assert len(lengths) > 1 and all(lengths)  # stddev 20: lengths vary, each verified exact by the command
    # the command's own check compares usage.prompt_tokens with the requested length; recompute it here too
    from kvbm_cli.bench.prefix_reuse import PrefixReuseConfig, make_requests
    from kvbm_cli.bench.prompts import PromptTokenizer

    cfg = PrefixReuseConfig(prefix_prompt_length=384, num_prefix_prompts=2, synthetic_input_tokens_mean=100,
                            synthetic_input_tokens_stddev=20, output_tokens_mean=12, request_count=6,
                            warmup_request_count=1, endpoint_type=endpoint, concurrency=2)
    specs = make_requests(cfg, PromptTokenizer(summary.config["tokenizer"]))
    expected = {s.request_id: s.expected_input_tokens for s in specs}
    assert {r.request_id: r.input_tokens for r in records} == expected
    assert summary.num_requests == 6 and summary.num_errors == 0 and summary.driver == "native"
    assert summary.ttft_s.p50 is not None and summary.output_tokens_per_s > 0 and summary.engine is None
    assert json.loads(o.stdout)["num_requests"] == 6
    assert _ttft_count(server) - before == 7  # vLLM saw every request, warm-up included


def test_requests_that_fail_are_recorded_with_the_servers_reason(server, tmp_path):
    o = run_kvbm("bench", "prefix-reuse", "--url", server, "--synthetic-input-tokens-mean", "5000",
                 "--request-count", "2", "--artifact-dir", str(tmp_path / "r"))
    assert o.exit_code == 1 and "all 2 requests failed" in o.stderr and "Traceback" not in o.stderr
    records, summary = read_run(tmp_path / "r")
    assert summary.num_errors == 2 and summary.ttft_s.p50 is None
    assert all(r.error.startswith("HTTP 400") and "4096" in r.error and r.ttft_s is None for r in records)


def test_multi_round_history_grows_across_rounds(server, tmp_path):
    o = run_kvbm("bench", "multi-round", "--url", server, "--num-users", "2", "--num-rounds", "3", "--qps", "4",
                 "--shared-system-prompt", "200", "--user-history-prompt", "300", "--answer-len", "8",
                 "--time", "0", "--artifact-dir", str(tmp_path / "mr"))
    assert o.exit_code == 0, o.stderr
    records, summary = read_run(tmp_path / "mr")
    warm = [r for r in records if r.warmup]
    assert [r.round for r in warm] == [1, 2] and {r.user_id for r in warm} == {0}
    measured = [r for r in records if not r.warmup]
    assert {r.user_id for r in measured} == {1, 2} and all(r.error is None for r in measured)
    for user in (1, 2):
        rounds = sorted((r.round, r.input_tokens) for r in measured if r.user_id == user)
        assert [x for x, _ in rounds] == sorted({x for x, _ in rounds}) and rounds[-1][0] == 3
        sizes = [n for _, n in rounds]
        assert sizes == sorted(sizes) and sizes[0] > 500  # system + history, then the chat grows
    assert all(r.output_tokens == 8 and r.ttft_s is not None for r in measured)
    assert summary.workload == "multi-round" and summary.config["num_users"] == 2


@pytest.mark.skipif(shutil.which("aiperf") is None, reason="aiperf not installed (pip install aiperf==0.13.0)")
def test_aiperf_driver_writes_the_same_files(server, tmp_path):
    o = run_kvbm("bench", "prefix-reuse", "--url", server, "--driver", "aiperf", "--prefix-prompt-length", "256",
                 "--num-prefix-prompts", "2", "--synthetic-input-tokens-mean", "64", "--output-tokens-mean", "8",
                 "--request-count", "4", "--warmup-request-count", "1", "--artifact-dir", str(tmp_path / "a"),
                 env={"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE")})
    assert o.exit_code == 0, o.stderr
    records, summary = read_run(tmp_path / "a")
    assert summary.driver == "aiperf" and summary.num_requests == 4 and summary.num_errors == 0
    assert sum(r.warmup for r in records) == 1
    assert all(r.ttft_s and r.output_tokens == 8 and r.input_tokens > 256 for r in records)
