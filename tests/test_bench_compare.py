"""`kvbm bench compare` end to end on the CPU prefix-reuse scenario (`make demo`): baseline and KVBM engines
launched in turn, result files per config, the comparison table, and KVBM's hits visible in vLLM's metrics.

This test needs the KVBM connector: if `kvbm.vllm_integration.connector` cannot be imported it fails, loudly."""

from __future__ import annotations

import importlib
import json

import pytest

from kvbm_cli.bench.compare import default_scenario
from kvbm_cli.results import read_run
from kvbm_runner import run_kvbm

pytestmark = pytest.mark.engine


def test_compare_cpu_prefix_reuse_end_to_end(tmp_path):
    module = importlib.import_module("kvbm.vllm_integration.connector")  # no skip: KVBM must be there
    assert hasattr(module, "DynamoConnector")
    out = tmp_path / "demo"
    o = run_kvbm("bench", "compare", str(default_scenario()), "--out", str(out), env={"VLLM_CPU_KVCACHE_SPACE": None})
    assert o.exit_code == 0, o.stderr[-3000:]
    assert "| TTFT p50 (ms) |" in o.stdout and "kvbm vs baseline" in o.stdout
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["configs"] == ["baseline", "kvbm"] and comp["baseline"] == "baseline"
    for name in ("baseline", "kvbm"):
        records, summary = read_run(out / name)
        assert summary.num_requests == 30 and summary.num_errors == 0 and summary.run == name
        assert {r.input_tokens for r in records} == {1536 + 128} and {r.output_tokens for r in records} == {50}
        assert summary.engine["connector"] == ("kvbm" if name == "kvbm" else "none")
        assert (out / name / "engine.log").stat().st_size > 0
    kvbm_summary = read_run(out / "kvbm")[1]
    assert kvbm_summary.engine["env"]["DYN_KVBM_CPU_CACHE_GB"] == "1"
    assert '"kv_connector":"DynamoConnector"' in " ".join(kvbm_summary.engine["vllm_args"])
    cache = {c["config"]: c for c in comp["cache"]}
    # the baseline recomputes every evicted prefix; KVBM brings them back from host memory
    assert cache["baseline"]["kvbm_hit_tokens"] == 0
    assert cache["kvbm"]["kvbm_hit_tokens"] >= 20 * 1536
    assert cache["kvbm"]["vllm_ttft"]["count"] == 30
    ttft = next(r for r in comp["rows"] if r["metric"] == "TTFT p50 (ms)")
    assert ttft["values"]["kvbm"] < ttft["values"]["baseline"]
    # vLLM's and KVBM's metrics were recorded beside the results, for kvbm report.
    import csv

    rows = list(csv.DictReader(open(out / "kvbm" / "metrics.csv")))
    onboarded = [float(r["value"]) for r in rows if r["name"] == "kvbm_onboard_blocks_h2d"]
    assert onboarded and max(onboarded) >= 20 * 12, "KVBM's onboard counter was sampled and moved"
    assert any(r["name"].startswith("vllm:") for r in rows)
    assert not any(r["name"].startswith("kvbm_") for r in csv.DictReader(open(out / "baseline" / "metrics.csv")))


def test_compare_repeat_interleaves_abba_and_reports_medians(tmp_path):
    """`--repeat 2` starts the configs A B then B A (engine logs written in that order) and the table gives, per
    sweep value, the median of the per-repeat gains with their min-max; repeat 2 overrides the file's 1."""
    scenario = tmp_path / "s.yaml"
    scenario.write_text("""name: repeat-test
repeat: 1
workload: {type: prefix-reuse, synthetic-input-tokens-mean: 64, synthetic-input-tokens-stddev: 0,
           output-tokens-mean: 8, request-count: 2, endpoint-type: chat, streaming: true}
sweep: {concurrency: [1, 2]}
engine: {max-model-len: 1024}
configs: [{name: a, connector: none}, {name: b, connector: kvbm, cpu-cache-gb: 1}]
""")
    out = tmp_path / "out"
    o = run_kvbm("bench", "compare", str(scenario), "--repeat", "2", "--out", str(out),
                 env={"VLLM_CPU_KVCACHE_SPACE": None})
    assert o.exit_code == 0, o.stderr[-3000:]
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["starts"] == ["repeat-1/a", "repeat-1/b", "repeat-2/b", "repeat-2/a"]
    logs = [out / s / "engine.log" for s in comp["starts"]]
    assert [p.stat().st_mtime for p in logs] == sorted(p.stat().st_mtime for p in logs)
    reps = [json.loads((out / f"repeat-{i}" / "comparison.json").read_text()) for i in (1, 2)]
    for j, point in enumerate(comp["points"]):
        assert point["repeats"] == 2 and point["configs"] == ["a", "b"]
        tps = next(r for r in point["rows"] if r["metric"] == "output tokens/s")
        gains = sorted(next(r for r in rep["points"][j]["rows"] if r["metric"] == "output tokens/s")["gain_vs_a"]["b"]
                       for rep in reps)
        assert tps["gain_range"]["b"] == gains and tps["gain_vs_a"]["b"] == pytest.approx(sum(gains) / 2)
        assert len(point["cache"]) == 4
        for name in ("a", "b"):
            assert read_run(out / "repeat-2" / name / point["label"])[1].num_requests == 2
    assert "Median of 2 interleaved repeats" in o.stdout and f"({gains[0]:.2f}-{gains[1]:.2f})" in o.stdout


@pytest.mark.parametrize("args,yaml_repeat", [(["--repeat", "0"], 1), (["--repeat", "x"], 1), ([], 0), ([], '"x"')])
def test_compare_bad_repeat_is_one_line(tmp_path, args, yaml_repeat):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(f"name: t\nrepeat: {yaml_repeat}\nworkload: {{type: prefix-reuse}}\n"
                        "configs: [{name: a, connector: none}, {name: b, connector: none}]\n")
    o = run_kvbm("bench", "compare", str(scenario), *args, "--out", str(tmp_path / "out"))
    assert o.exit_code == 2 and "repeat" in o.stderr and len(o.stderr.strip().splitlines()) == 1, o.stderr
    assert not (tmp_path / "out").exists()
