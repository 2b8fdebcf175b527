"""kvbm serve / kvbm bench argument handling and errors (no engine), exact-length prompts, metrics parsing."""

from __future__ import annotations

import json
import random
import socket
import textwrap

import pytest

from kvbm_cli import prom
from kvbm_cli.bench import compare
from kvbm_cli.bench.drivers import import_aiperf
from kvbm_cli.bench.prefix_reuse import PrefixReuseConfig, make_requests
from kvbm_cli.bench.prompts import PromptTokenizer, build_prefix, build_prompt
from kvbm_cli.engine import KV_TRANSFER_CONFIG, explain_failure
from kvbm_runner import run_kvbm

EXPECTED_KV_TRANSFER = ('{"kv_connector":"DynamoConnector","kv_role":"kv_both",'
                        '"kv_connector_module_path":"kvbm.vllm_integration.connector"}')
CLEAN_ENV = {"VLLM_CPU_KVCACHE_SPACE": None, "DYN_KVBM_CPU_CACHE_GB": None, "DYN_KVBM_DISK_CACHE_GB": None,
             "DYN_KVBM_DISK_CACHE_DIR": None, "HF_HUB_OFFLINE": None}


def _one_line_error(outcome, code: int, *needles: str) -> str:
    assert outcome.exit_code == code, (outcome.stdout, outcome.stderr)
    assert "Traceback" not in outcome.stderr
    lines = [ln for ln in outcome.stderr.splitlines() if ln.startswith("kvbm:")]
    assert len(lines) == 1, outcome.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _dry(*args: str, env=None) -> dict:
    o = run_kvbm("serve", "--dry-run", "--json", *args, env=CLEAN_ENV | (env or {}))
    assert o.exit_code == 0, o.stderr
    return json.loads(o.stdout)


# --- kvbm serve ---------------------------------------------------------------------------------------------

def test_serve_dry_run_default_is_the_tiny_model_on_cpu():
    d = _dry()
    argv = d["argv"]
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    from kvbm_cli.tiny_model import default_model_dir

    assert argv[argv.index("--model") + 1] == str(default_model_dir())
    has_weights = (default_model_dir() / "model.safetensors").is_file()
    assert ("--load-format" in argv) != has_weights and "--enforce-eager" in argv  # dummy weights only if none
    assert "--kv-transfer-config" not in argv and argv[argv.index("--port") + 1] == "8000"
    assert d["env_set"] == {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def test_serve_connector_kvbm_is_dynamos_config_and_sets_the_tier_variables(tmp_path):
    d = _dry("--connector", "kvbm", "--cpu-cache-gb", "20", "--disk-cache-gb", "100", "--disk-cache-dir",
             str(tmp_path), "--port", "8123", "--block-size", "64", "--", "--seed", "7", "--max-num-seqs", "4")
    argv = d["argv"]
    assert argv[argv.index("--kv-transfer-config") + 1] == EXPECTED_KV_TRANSFER == KV_TRANSFER_CONFIG
    assert d["env_set"]["DYN_KVBM_CPU_CACHE_GB"] == "20" and d["env_set"]["DYN_KVBM_DISK_CACHE_GB"] == "100"
    assert d["env_set"]["DYN_KVBM_DISK_CACHE_DIR"] == str(tmp_path)
    assert argv[-4:] == ["--seed", "7", "--max-num-seqs", "4"]  # after --: unchanged, last
    assert argv[argv.index("--block-size") + 1] == "64" and d["url"] == "http://127.0.0.1:8123"


def test_serve_kvbm_variables_from_the_environment_count():
    d = _dry("--connector", "kvbm", env={"DYN_KVBM_CPU_CACHE_GB": "4"})
    assert "DYN_KVBM_CPU_CACHE_GB" not in d["env_set"]
    assert not any("nowhere to offload" in n for n in d["notes"])
    assert any("nowhere to offload" in n for n in _dry("--connector", "kvbm")["notes"])


def test_serve_g1_size_on_cpu_unsets_the_overriding_variable():
    d = _dry("--kv-cache-memory-bytes", str(52 * 256 * 1024), env={"VLLM_CPU_KVCACHE_SPACE": "4"})
    argv = d["argv"]
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(52 * 256 * 1024)
    assert d["env_unset"] == ["VLLM_CPU_KVCACHE_SPACE"] and "VLLM_CPU_KVCACHE_SPACE" not in d["env_set"]
    assert argv[argv.index("--max-model-len") + 1] == str(51 * 128)  # what 51 usable blocks hold
    d = _dry("--gpu-cache-gb", "0.5")
    assert d["argv"][d["argv"].index("--kv-cache-memory-bytes") + 1] == "500000000"


def test_serve_gpu_memory_utilization_is_passed_and_explained_on_cpu():
    o = run_kvbm("serve", "--dry-run", "--gpu-memory-utilization", "0.2", env=CLEAN_ENV)
    assert o.exit_code == 0 and "--gpu-memory-utilization 0.2" in o.stdout
    assert "no effect on vLLM's CPU build" in o.stderr
    _one_line_error(run_kvbm("serve", "--dry-run", "--gpu-memory-utilization", "1.5"), 2, "--gpu-memory-utilization")


@pytest.mark.parametrize("args, needles", [
    (["--connector", "lmcache"], ["'--connector'", "'lmcache' is not one of 'kvbm', 'none'"]),
    (["--kv-cache-memory-bytes", "1000", "--gpu-cache-gb", "1"], ["not both"]),
    (["--model", "/no/such/model/dir"], ["model not found", "/no/such/model/dir"]),
    (["--block-size", "100"], ["multiple of 32"]),
    (["--kv-cache-memory-bytes", "1000"], ["holds no full"]),
])
def test_serve_usage_errors_are_one_line(args, needles):
    _one_line_error(run_kvbm("serve", "--dry-run", *args, env=CLEAN_ENV), 2, *needles)


def test_serve_port_in_use_is_refused_before_launching():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        o = run_kvbm("serve", "--port", str(port), "--host", "127.0.0.1", env=CLEAN_ENV)
    _one_line_error(o, 2, "port in use", str(port))


@pytest.mark.parametrize("log, expected", [
    ("OSError: [Errno 98] error while attempting to bind on address ('0.0.0.0', 8000): address already in use",
     "port in use"),
    ("ModuleNotFoundError: No module named 'kvbm'", "connector import error"),
    ("AttributeError: Class DynamoConnector not found in kvbm.vllm_integration.connector", "class DynamoConnector"),
    ("ValueError: To serve at least one request with the models's max seq len (16384), (32.0 MiB KV cache is "
     "needed, which is larger than the available KV cache memory (1.0 MiB). Based on the available memory...",
     "KV cache too small"),
    ("RuntimeError: Available memory on node 0 (6.92/8.96 GiB) is less than desired CPU memory utilization (0.92, "
     "8.25 GiB)", "out of memory"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "out of memory"),
    ("huggingface_hub.errors.OfflineModeIsEnabled: Cannot reach https://huggingface.co/api/models/x", "model not found"),
    ("OSError: no-org/no-model is not a local folder and is not a valid model identifier", "model not found"),
])
def test_known_engine_failures_become_one_line(log, expected):
    line = explain_failure("INFO starting\n" + log + "\nINFO bye", 1)
    assert expected in line and "\n" not in line
    assert "killed" in explain_failure("INFO loading", -9)


# --- prompts ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return PromptTokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("prefix, total", [(1536, 1664), (256, 270), (130, 4000)])
def test_prompts_are_exact_in_tokens_and_share_their_prefix(tok, endpoint, prefix, total):
    rng = random.Random(1)
    p = build_prefix(tok, endpoint, prefix, rng)
    a, b = build_prompt(tok, endpoint, p, prefix, total, rng), build_prompt(tok, endpoint, p, prefix, total, rng)
    assert tok.count(endpoint, a) == tok.count(endpoint, b) == total and a != b
    if endpoint == "chat":
        ids_a = tok.tok.encode(tok._render(a), add_special_tokens=False).ids
        ids_b = tok.tok.encode(tok._render(b), add_special_tokens=False).ids
    else:
        ids_a, ids_b = tok.tok.encode(a).ids, tok.tok.encode(b).ids
    assert ids_a[:prefix] == ids_b[:prefix] and ids_a[prefix] != ids_b[prefix] or ids_a[prefix:] != ids_b[prefix:]


def test_prefix_reuse_requests_follow_genai_perf_flags(tok):
    cfg = PrefixReuseConfig(prefix_prompt_length=512, num_prefix_prompts=3, synthetic_input_tokens_mean=100,
                            synthetic_input_tokens_stddev=10, output_tokens_mean=20, request_count=12,
                            warmup_request_count=2, prefix_order="round-robin")
    specs = make_requests(cfg, tok)
    assert [s.warmup for s in specs] == [True, True] + [False] * 12
    assert [s.prefix_id for s in specs] == [k % 3 for k in range(14)]
    lengths = [s.expected_input_tokens - 512 for s in specs]
    assert len(set(lengths)) > 1 and all(60 < n < 140 for n in lengths)
    assert all(tok.count("chat", s.prompt) == s.expected_input_tokens for s in specs)
    assert make_requests(cfg, tok)[5].prompt == specs[5].prompt  # same seed, same prompts
    rnd = make_requests(PrefixReuseConfig(prefix_prompt_length=512, num_prefix_prompts=3, request_count=30,
                                          synthetic_input_tokens_mean=10), tok)
    assert {s.prefix_id for s in rnd} == {0, 1, 2} and [s.prefix_id for s in rnd] != [k % 3 for k in range(30)]


def test_too_short_prefix_names_the_template(tok):
    with pytest.raises(Exception, match="chat template's head"):
        build_prefix(tok, "chat", 2, random.Random(0))


# --- kvbm bench argument errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, code, needles", [
    (["--concurrency", "2", "--request-rate", "1"], 2, ["--concurrency or --request-rate"]),
    (["--prefix-prompt-length", "100"], 2, ["go together"]),
    (["--endpoint-type", "embeddings"], 2, ["'--endpoint-type'", "'chat', 'completions'"]),
    (["--driver", "genai-perf"], 2, ["perf_analyzer", "PyPI"]),
    (["--driver", "vegeta"], 2, ["'--driver'", "'native', 'aiperf', 'genai-perf'"]),
    (["--url", "http://127.0.0.1:9"], 1, ["no OpenAI-compatible server at http://127.0.0.1:9"]),
])
def test_prefix_reuse_errors(tmp_path, args, code, needles):
    _one_line_error(run_kvbm("bench", "prefix-reuse", "--artifact-dir", str(tmp_path / "r"), *args,
                             env={"PATH": str(tmp_path)}), code, *needles)


def test_aiperf_missing_is_one_line(tmp_path):
    _one_line_error(run_kvbm("bench", "prefix-reuse", "--driver", "aiperf", env={"PATH": str(tmp_path)}), 2,
                    "aiperf is not installed", "pip install aiperf")


def test_multi_round_errors():
    _one_line_error(run_kvbm("bench", "multi-round", "--qps", "0"), 2, "--qps must be > 0")
    _one_line_error(run_kvbm("bench", "multi-round", "--driver", "aiperf"), 2, "native client only")


def test_aiperf_export_is_imported(tmp_path):
    line = {"metadata": {"x_request_id": "a1", "request_start_ns": 1_800_000_000_000_000_000,
                         "benchmark_phase": "profiling"},
            "metrics": {"time_to_first_token": {"value": 70.5, "unit": "ms"},
                        "request_latency": {"value": 80.0, "unit": "ms"},
                        "inter_chunk_latency": {"value": [1.0, 2.0], "unit": "ms"},
                        "usage_prompt_tokens": {"value": 395, "unit": "tokens"},
                        "usage_completion_tokens": {"value": 10, "unit": "tokens"}}}
    bad = {"metadata": {"x_request_id": "a2", "request_start_ns": 1, "benchmark_phase": "warmup"},
           "metrics": {"error_isl": {"value": 384, "unit": "tokens"}},
           "error": {"type": "ClientConnectorError", "message": "refused"}}
    path = tmp_path / "profile_export.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps(bad) + "\n")
    ok, err = import_aiperf(path, "r", "prefix-reuse")
    assert (ok.ttft_s, ok.e2e_s, ok.itl_s, ok.input_tokens, ok.output_tokens) == (0.0705, 0.08, [0.001, 0.002], 395, 10)
    assert ok.start_s == 1.8e9 and not ok.warmup and ok.error is None
    assert err.warmup and err.error == "ClientConnectorError: refused" and err.ttft_s is None and err.input_tokens == 384


# --- compare: scenarios and metrics ---------------------------------------------------------------------------

def test_shipped_scenarios_load():
    for name in ("prefix-reuse-cpu", "prefix-reuse", "multi-round", "multi-round-cpu"):
        s = compare.load_scenario(compare.SCENARIO_DIR / f"{name}.yaml")
        assert [c["name"] for c in s.configs] == ["baseline", "kvbm"]
    seed = compare.load_scenario(compare.SCENARIO_DIR / "prefix-reuse.yaml")
    wl = seed.workload
    assert (wl["prefix-prompt-length"], wl["num-prefix-prompts"], wl["synthetic-input-tokens-mean"],
            wl["output-tokens-mean"], wl["concurrency"], wl["request-count"]) == (20000, 5, 128, 50, 1, 30)
    name, spec = compare.engine_spec(seed.engine, seed.configs[1])
    assert (spec.model, spec.gpu_memory_utilization, spec.cpu_cache_gb, spec.connector) == \
        ("Qwen/Qwen3-4B", 0.2, 20, "kvbm")


@pytest.mark.parametrize("body, needle", [
    ("name: x\nworkload: {type: prefix-reuse}\nconfigs: [{name: a}]\n", "at least two configs"),
    ("name: x\nworkload: {type: chat}\nconfigs: [{name: a}, {name: b}]\n", "prefix-reuse, multi-round or hit-rate"),
    ("name: x\nworkload: {type: prefix-reuse, prefix-length: 5}\nconfigs: [{name: a}, {name: b}]\n",
     "workload.prefix-length: unknown key"),
    ("name: x\nworkload: {type: prefix-reuse}\nconfigs: [{name: a}, {name: b, cpu-gb: 1}]\n", "configs (b).cpu-gb: unknown key"),
    ("name: x\nworkload: {type: prefix-reuse, request-count: lots}\nconfigs: [{name: a}, {name: b}]\n",
     "workload.request-count: Input should be a valid integer"),
    ("name: x\nworkload: {type: prefix-reuse}\nconfigs: [{name: a}, {name: a}]\n", "unique"),
    ("name: [x\n", "not valid YAML"),
    ("workload: {type: prefix-reuse}\nconfigs: []\n", "name"),
])
def test_bad_scenarios_are_one_line(tmp_path, body, needle):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(body))
    _one_line_error(run_kvbm("bench", "compare", str(path)), 2, needle)
    _one_line_error(run_kvbm("bench", "compare", str(tmp_path / "none.yaml")), 2, "scenario not found")


def test_histogram_quantiles_as_prometheus_estimates_them():
    text = textwrap.dedent("""\
        vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="m"} 0.0
        vllm:time_to_first_token_seconds_bucket{engine="0",le="0.05",model_name="m"} 10.0
        vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 20.0
        vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 20.0
        vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 1.2
        vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 20.0
        vllm:prefix_cache_hits_total{engine="0",model_name="m"} 256.0
        """)
    m = prom.parse(text)
    d = compare.metrics_delta({}, m)
    t = d["vllm:time_to_first_token_seconds"]
    assert (t["count"], t["sum"], t["mean"]) == (20.0, 1.2, 0.06)
    assert t["p50"] == pytest.approx(0.05) and t["p90"] == pytest.approx(0.09)
    assert d["vllm:prefix_cache_hits"] == 256.0
    assert prom.histogram_quantile(0.25, [(0.01, 0), (0.05, 10), (0.1, 20)]) == pytest.approx(0.03)


def test_compare_names_a_config_whose_client_got_tokens_in_bursts():
    """A config whose client measured tokens far closer together than vLLM made them (its API server fell behind
    and flushed whole streams) gets a line saying so under the table; a config streamed as made gets none."""
    from kvbm_cli.results import Stats, Summary

    def result(client_itl_s: float, server_itl_s: float) -> dict:
        s = Stats(mean=0.1, p50=0.1, p90=0.1)
        summary = Summary(run="r", workload="prefix-reuse", url="http://x", model="m", started_at="t", duration_s=1.0,
                          num_requests=2, num_errors=0, ttft_s=s, itl_s=Stats(mean=client_itl_s), e2e_s=s,
                          output_tokens_per_s=1.0, input_tokens_per_s=1.0, requests_per_s=1.0)
        return {"summary": summary, "vllm_metrics": {"vllm:inter_token_latency_seconds": {"mean": server_itl_s}}}

    scenario = compare.load_scenario(compare.default_scenario())
    comp = compare.build_comparison(scenario, {"baseline": result(0.00018, 0.0026), "kvbm": result(0.0029, 0.0028)})
    text = compare.comparison_markdown(comp)
    assert "- baseline: tokens reached the client in bursts (client ITL mean 0.18 ms against the engine's 2.60 ms)" \
        in text
    assert "- kvbm: tokens reached" not in text
    smooth = compare.comparison_markdown(compare.build_comparison(
        scenario, {"baseline": result(0.0025, 0.0026), "kvbm": result(0.0029, 0.0028)}))
    assert "in bursts" not in smooth  # the negative control: the same table without a starved server
