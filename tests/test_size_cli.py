"""`kvbm size` as a user runs it: tables, --json numbers, model lookup, and one-line errors."""

from __future__ import annotations

import json

import pytest

from kvbm_runner import run_kvbm

BLOCK = 147_456 * 16  # Qwen3-4B bf16, 16 tokens


def size_json(*args: str, env: dict | None = None) -> dict:
    result = run_kvbm("size", *args, "--json", env=env)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_qwen3_4b_with_cpu_and_disk_tiers():
    r = size_json("--model", "Qwen/Qwen3-4B", "--cpu-gb", "20", "--disk-gb", "100")
    assert r["kv_bytes_per_token"] == 147_456
    assert r["kv_bytes_per_block"] == BLOCK
    tiers = {t["tier"]: t for t in r["tiers"]}
    assert tiers["cpu"]["num_blocks"] == 20_000_000_000 // BLOCK == 8477
    assert tiers["cpu"]["num_tokens"] == 8477 * 16
    assert tiers["cpu"]["num_prefixes"] == 8477 // 1250 == 6
    assert tiers["disk"]["num_blocks"] == 100_000_000_000 // BLOCK == 42385
    assert tiers["disk"]["setting"] == "DYN_KVBM_DISK_CACHE_GB=100"
    be = {b["tier"]: b for b in r["break_even"]}
    assert be["cpu"]["pays_from_tokens"] == 1
    assert be["cpu"]["onboard_s"] == pytest.approx(20_000 * 147_456 / 55.1e9)
    assert be["disk"]["onboard_s"] == pytest.approx(20_000 * 147_456 / 1.8e9)
    assert be["disk"]["pays_from_tokens"] is None
    assert be["disk"]["verdict"].startswith("disk never pays for this model here")


def test_table_output_shows_numbers_formula_and_verdicts():
    result = run_kvbm("size", "--model", "Qwen/Qwen3-4B", "--cpu-gb", "20", "--disk-gb", "100")
    assert result.exit_code == 0, result.stderr
    for text in ("147,456", "2,359,296", "8,477", "42,385", "GPU memory  = Model Size + Active Blocks x Block Size",
                 "CPU memory  = DYN_KVBM_CPU_CACHE_GB=20 = 20.00 GB", "CPU pays for every prefix length",
                 "disk never pays for this model here"):
        assert text in result.stdout
    assert "kvbm doctor disk" in result.stderr  # the assumed disk bandwidth is said, on stderr


def test_measured_prefill_calibrates_recompute_to_design_md():
    # DESIGN.md section 4: prefill of 20,128 tokens took 0.61 s on the H100.
    r = size_json("--model", "Qwen/Qwen3-4B", "--cpu-gb", "20", "--disk-gb", "100",
                  "--prefix-len", "20128", "--prefill-tps", str(20_128 / 0.61))
    assert r["compute"]["recompute_s"] == pytest.approx(0.61)
    be = {b["tier"]: b for b in r["break_even"]}
    assert be["cpu"]["onboard_s"] == pytest.approx(0.054, abs=0.001)
    assert be["disk"]["onboard_s"] == pytest.approx(1.65, abs=0.01)
    assert be["disk"]["pays_from_tokens"] is None


def test_disk_bandwidth_from_doctor_json_can_make_disk_pay(tmp_path):
    report = tmp_path / "disk.json"
    report.write_text(json.dumps({"throughput": {"random_read_bytes_per_s": 5e9, "seq_read_bytes_per_s": 6e9}}))
    r = size_json("--model", "Qwen/Qwen3-4B", "--cpu-gb", "20", "--disk-gb", "100", "--doctor-json", str(report))
    disk = next(b for b in r["break_even"] if b["tier"] == "disk")
    assert disk["bytes_per_s"] == 5e9 and "measured" in disk["bandwidth_source"]
    n = disk["pays_from_tokens"]
    assert 1 < n < 40_960
    assert disk["verdict"].startswith(f"disk pays for prefixes over {n - 1:,} tokens on this disk")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = run_kvbm("size", "--model", "Qwen/Qwen3-4B", "--doctor-json", str(bad))
    assert result.exit_code == 2 and "kvbm doctor disk" in result.stderr


def test_fit_prefixes_gives_the_gb_each_tier_needs():
    r = size_json("--model", "Qwen/Qwen3-4B", "--fit-prefixes", "5", "--prefix-len", "20000")
    assert r["fit"]["cpu_cache_gb"] == pytest.approx(5 * 1250 * BLOCK / 1e9) == pytest.approx(14.7456)
    assert r["fit"]["gpu_memory_gb"] == pytest.approx(14.7456 + 1 + r["model"]["weight_bytes"] / 1e9)
    table = run_kvbm("size", "--model", "Qwen/Qwen3-4B", "--fit-prefixes", "5")
    assert "DYN_KVBM_CPU_CACHE_GB=14.7" in table.stdout


def test_mla_and_tensor_parallel():
    r = size_json("--model", "deepseek-ai/DeepSeek-V3", "--tp", "8", "--gpu", "h200", "--cpu-gb", "100")
    assert r["model"]["attention"] == "MLA"
    assert r["kv_bytes_per_token"] == 61 * 576 * 2
    r = size_json("--model", "meta-llama/Llama-3.1-70B", "--tp", "4", "--dtype", "fp8")
    assert r["kv_bytes_per_token"] == 2 * 80 * 2 * 128 * 1


def test_tiers_default_to_the_dyn_kvbm_environment():
    r = size_json("--model", "Qwen/Qwen3-4B", env={"DYN_KVBM_CPU_CACHE_GB": "8"})
    cpu = next(t for t in r["tiers"] if t["tier"] == "cpu")
    assert cpu["num_blocks"] == 8_000_000_000 // BLOCK


def test_local_directory_and_hf_cache(tmp_path):
    cfg = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 512, "vocab_size": 2048, "torch_dtype": "bfloat16", "max_position_embeddings": 4096}
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert size_json("--model", str(model_dir))["kv_bytes_per_token"] == 2 * 4 * 2 * 64 * 2
    assert size_json("--model", str(model_dir / "config.json"))["kv_bytes_per_token"] == 2048
    hub = tmp_path / "hub"
    snap = hub / "models--acme--tiny-qwen" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 8}))
    (hub / "models--acme--tiny-qwen" / "refs").mkdir()
    (hub / "models--acme--tiny-qwen" / "refs" / "main").write_text("abc123")
    r = size_json("--model", "acme/tiny-qwen", env={"HF_HUB_CACHE": str(hub)})
    assert r["kv_bytes_per_token"] == 2 * 8 * 2 * 64 * 2
    assert r["model"]["source"].endswith("abc123/config.json")


@pytest.mark.parametrize("args, message", [
    (["--model", "acme/no-such-model"], "unknown model 'acme/no-such-model'"),
    (["--model", "Qwen/Qwen3-4B", "--disk-gb", "100"], "needs a CPU tier"),
    (["--model", "Qwen/Qwen3-4B", "--tp", "3"], "--tp 3 does not divide"),
    (["--model", "Qwen/Qwen3-4B", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["--model", "Qwen/Qwen3-4B", "--gpu", "tpu"], "--gpu 'tpu' is not known"),
    (["--model", "Qwen/Qwen3-4B", "--gpu-util", "1.5"], "--gpu-util 1.5"),
    (["--model", "Qwen/Qwen3-4B", "--cpu-gb", "-1"], "--cpu-gb -1.0 must not be negative"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run_kvbm("size", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.startswith("kvbm: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_dyn_kvbm_variable_is_a_configuration_error():
    result = run_kvbm("size", "--model", "Qwen/Qwen3-4B", env={"DYN_KVBM_CPU_CACHE_GB": "lots"})
    assert result.exit_code == 2
    assert "DYN_KVBM_CPU_CACHE_GB='lots' is not a number" in result.stderr


def test_without_model_uses_the_embedded_tiny_model(tmp_path):
    tiny = pytest.importorskip("kvbm_cli.tiny_model", reason="the embedded default model is not in this checkout")
    r = size_json(env={"KVBM_CACHE_DIR": str(tmp_path)})
    assert r["model"]["name"].startswith(tiny.TINY_MODEL_NAME)
    assert r["kv_bytes_per_token"] == 2 * tiny.NUM_LAYERS * tiny.NUM_KV_HEADS * tiny.HEAD_DIM * 2
