"""`kvbm bench compare` with two engine instances (issue 12): the scenario keys `instances` and `remote`, their
errors (one line, exit 2, before any engine starts), and one small real run: two engines per configuration
behind the round-robin client, the baseline's engines sharing nothing (the negative control: no prefix crosses),
shared-g4's engines sharing one redis-server kvbm starts (every measured prefix, computed on the other engine, is
onboarded from G4)."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from kvbm.mechanism.remote.local_server import available
from kvbm_cli.bench import compare
from kvbm_cli.results import read_run
from kvbm_runner import run_kvbm

WORKLOAD = "workload: {type: prefix-reuse, prefix-prompt-length: 512, num-prefix-prompts: 3}\n"


def _one_line(outcome, needle: str) -> None:
    assert outcome.exit_code == 2, (outcome.stdout, outcome.stderr)
    lines = [ln for ln in outcome.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in outcome.stderr and len(lines) == 1 and needle in lines[0], outcome.stderr


def test_shipped_two_instance_scenario_loads():
    s = compare.load_scenario("g4-two-instance-cpu")
    assert s.instances == 2 and [c["name"] for c in s.configs] == ["baseline", "shared-g4"]
    assert [c.get("remote") for c in s.configs] == [None, "redis"]
    wl = s.workload  # an odd number of prefixes, each computed once in the warm-up: it returns on the other engine
    assert wl["num-prefix-prompts"] % 2 == 1 and wl["warmup-request-count"] == wl["num-prefix-prompts"]
    for raw in s.configs:
        name, spec = compare.engine_spec(s.engine, raw)
        assert spec.connector == "kvbm" and spec.cpu_cache_gb == 1 and spec.remote_url is None


@pytest.mark.parametrize("body, needle", [
    ("instances: 0\n" + WORKLOAD + "configs: [{name: a}, {name: b}]\n", "instances: Input should be greater than"),
    ("instances: 2\nworkload: {type: multi-round}\nconfigs: [{name: a}, {name: b}]\n",
     "instances: 2 needs a prefix-reuse workload"),
    ("instances: 2\ndriver: aiperf\n" + WORKLOAD + "configs: [{name: a}, {name: b}]\n", "and the native driver"),
    (WORKLOAD + "configs: [{name: a}, {name: b, connector: kvbm, remote: s3}]\n", "configs (b).remote: must be redis"),
    (WORKLOAD + "configs: [{name: a}, {name: b, remote: redis}]\n", "configs (b).remote: needs connector: kvbm"),
    (WORKLOAD + "configs: [{name: a}, {name: b, connector: kvbm, remote: redis, remote-url: 'redis://h:1/0'}]\n",
     "and no remote-url"),
])
def test_bad_two_instance_scenarios_are_one_line(tmp_path, body, needle):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\n" + textwrap.dedent(body))
    _one_line(run_kvbm("bench", "compare", str(path), "--out", str(tmp_path / "out")), needle)


def test_remote_redis_without_redis_server_is_one_line(tmp_path):
    out = run_kvbm("bench", "compare", "g4-two-instance-cpu", "--out", str(tmp_path / "out"),
                   env={"PATH": str(tmp_path)})  # no redis-server on this PATH
    _one_line(out, "remote: redis needs redis-server")
    assert not (tmp_path / "out" / "baseline" / "engine.log").exists(), "an engine started before the check"


@pytest.mark.engine
@pytest.mark.skipif(not available(), reason="redis-server is not installed: run `make redis`")
def test_two_instances_round_robin_share_prefixes_only_through_g4(tmp_path):
    scenario = yaml.safe_load((compare.SCENARIO_DIR / "g4-two-instance-cpu.yaml").read_text())
    scenario["workload"] |= {"prefix-prompt-length": 512, "num-prefix-prompts": 3, "warmup-request-count": 3,
                             "request-count": 3, "output-tokens-mean": 4}
    scenario["engine"] |= {"kv-cache-memory-bytes": 16 * 2**20, "max-model-len": 1024, "cpu-cache-gb": 0.1}
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(scenario))
    out = tmp_path / "out"
    o = run_kvbm("bench", "compare", str(path), "--out", str(out), env={"VLLM_CPU_KVCACHE_SPACE": None})
    assert o.exit_code == 0, o.stderr[-3000:]
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["configs"] == ["baseline", "shared-g4"] and "shared-g4 vs baseline" in o.stdout
    cache = {c["config"]: c for c in comp["cache"]}
    assert cache["baseline"]["kvbm_hit_tokens"] == 0, "a prefix crossed engines that share no store"
    assert cache["shared-g4"]["kvbm_hit_tokens"] == 3 * 512, "a measured prefix was not onboarded from G4"
    g4 = json.loads((out / "shared-g4" / "vllm_metrics.json").read_text())["kvbm"]
    assert g4["vllm:kvbm_transfer_blocks_total{direction=g4_g1}"] == 3 * 4
    for name in ("baseline", "shared-g4"):
        summary = read_run(out / name)[1]
        assert summary.num_requests == 3 and summary.num_errors == 0 and len(summary.engine["instances"]) == 2
        posts = [(out / name / log).read_text().count("POST /v1/chat/completions")
                 for log in ("engine.log", "engine-1.log")]
        assert posts == [3, 3], f"{name}: the round-robin client sent {posts} requests to the two engines"
