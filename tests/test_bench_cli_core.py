"""`kvbm bench transfer` and `kvbm bench ttft`: argument errors are one line and exit 2; a small transfer
bench runs for real and reports every path with its raw reference."""

import json

from kvbm_runner import run_kvbm


def test_transfer_bench_reports_every_path_against_its_raw_reference(tmp_path):
    out = run_kvbm("bench", "transfer", "--blocks", "16", "--repeats", "1", "--dir", str(tmp_path), "--json")
    assert out.exit_code == 0, out.stderr
    rows = {r["path"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"G1->G2 offload", "G2->G1 onboard", "G2->G3 offload", "G3->G1 onboard"}
    for r in rows.values():
        assert r["ours_gbps"] > 0 and r["raw_gbps"] > 0
        assert abs(r["ratio"] - r["ours_gbps"] / r["raw_gbps"]) < 1e-9
    assert not list(tmp_path.iterdir()), "the bench removes its files"


def test_transfer_bench_bad_input_is_one_line():
    out = run_kvbm("bench", "transfer", "--dir", "/nonexistent/kvbm")
    assert out.exit_code == 2 and "--dir /nonexistent/kvbm is not a directory" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = run_kvbm("bench", "transfer", "--io", "tape")
    assert out.exit_code == 2 and "'tape' is not one of 'posix', 'nixl'" in out.stderr


def test_ttft_bench_bad_input_is_one_line(tmp_path):
    out = run_kvbm("bench", "ttft", "--model", str(tmp_path))
    assert out.exit_code == 2 and "not a model directory" in out.stderr
    out = run_kvbm("bench", "ttft", "--g1-blocks", "8")
    assert out.exit_code == 2 and "cannot hold one 1600-token prompt" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_turns_a_kvbm_configuration_error_into_its_one_line():
    from kvbm_cli.engine import explain_failure

    log = ("(EngineCore pid=1) Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
           "(EngineCore pid=1) kvbm.errors.ConfigError: DYN_KVBM_CPU_CACHE_GB='abc' is not a number; set it to "
           "host memory (G2) cache size in GB, e.g. DYN_KVBM_CPU_CACHE_GB=8\n")
    line = explain_failure(log, 1)
    assert line.startswith("KVBM configuration: DYN_KVBM_CPU_CACHE_GB='abc' is not a number") and "\n" not in line


def test_bad_kvbm_variable_stops_a_real_engine_with_that_line(tmp_path):
    """A real vLLM start with a bad DYN_KVBM_* value: `kvbm serve` exits with the variable named, no traceback."""
    import pytest

    pytest.importorskip("vllm")
    log = tmp_path / "engine.log"
    out = run_kvbm("serve", "--connector", "kvbm", "--port", "0", "--health-timeout", "240", "--log-file", str(log),
                   env={"DYN_KVBM_CPU_CACHE_GB": "abc", "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.exit_code == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "DYN_KVBM_CPU_CACHE_GB='abc' is not a number" in last and "Traceback" not in out.stderr
    assert "Traceback" in log.read_text(), "the engine's own log keeps the details"
