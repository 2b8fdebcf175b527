"""kvbm.sizing against hand-computed numbers and DESIGN.md section 4's H100 measurements."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError
from kvbm import sizing
from kvbm_cli._models import BUILTIN_CONFIGS, find_builtin


def geometry(name: str) -> sizing.ModelGeometry:
    model_id, cfg = find_builtin(name)
    return sizing.ModelGeometry.from_config(cfg, model_id)


QWEN3_4B = geometry("Qwen/Qwen3-4B")


@pytest.mark.parametrize("name, expected", [
    ("Qwen/Qwen3-4B", 2 * 36 * 8 * 128 * 2),          # 147,456 (DESIGN.md: 144 KiB)
    ("Qwen/Qwen3-0.6B", 2 * 28 * 8 * 128 * 2),        # 114,688
    ("Qwen/Qwen3-32B", 2 * 64 * 8 * 128 * 2),         # 262,144
    ("llama-3.1-70b", 2 * 80 * 8 * 128 * 2),          # head_dim from hidden_size / heads = 8192 / 64
    ("mistral-7b", 2 * 32 * 8 * 128 * 2),
    ("deepseek-ai/DeepSeek-V3", 61 * (512 + 64) * 2),  # MLA: one latent per token and layer, not K and V
])
def test_kv_bytes_per_token(name, expected):
    assert geometry(name).kv_bytes_per_token() == expected


def test_qwen3_4b_is_147456_bytes_per_token_and_2_25_mib_per_16_token_block():
    assert QWEN3_4B.kv_bytes_per_token() == 147_456
    assert QWEN3_4B.kv_bytes_per_token() * 16 == 2_359_296 == int(2.25 * 2**20)
    assert QWEN3_4B.attention == "GQA"
    assert QWEN3_4B.kv_bytes_per_token("fp8") == 73_728
    assert QWEN3_4B.kv_bytes_per_token("fp32") == 294_912


def test_tensor_parallel_splits_gqa_heads_but_replicates_mla_latent():
    llama70 = geometry("llama-3.1-70b")
    assert llama70.kv_bytes_per_token(tp=4) == 2 * 80 * 2 * 128 * 2
    assert llama70.kv_bytes_per_token(tp=8) == 2 * 80 * 1 * 128 * 2
    assert llama70.kv_bytes_per_token(tp=16) == 2 * 80 * 1 * 128 * 2  # more ranks than heads: replicated
    with pytest.raises(ConfigError, match="does not divide"):
        llama70.kv_bytes_per_token(tp=3)
    ds = geometry("DeepSeek-V3")
    assert ds.attention == "MLA"
    assert ds.kv_bytes_per_token(tp=8) == ds.kv_bytes_per_token(tp=1) == 70_272
    assert ds.kv_bytes_per_token("fp8") == 35_136


def test_from_config_reads_real_field_variants():
    base = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}
    assert sizing.ModelGeometry.from_config({**base, "dtype": "float32"}).kv_bytes_per_token() == 2 * 4 * 2 * 64 * 4
    assert sizing.ModelGeometry.from_config({**base, "head_dim": 32}).kv_bytes_per_token() == 2 * 4 * 2 * 32 * 2
    no_kv = {k: v for k, v in base.items() if k != "num_key_value_heads"}
    assert sizing.ModelGeometry.from_config(no_kv).attention == "MHA"
    nested = {"model_type": "llava", "text_config": {**base, "torch_dtype": "float16"}}
    assert sizing.ModelGeometry.from_config(nested).kv_bytes_per_token() == 2 * 4 * 2 * 64 * 2
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        sizing.ModelGeometry.from_config({"hidden_size": 8})
    with pytest.raises(ConfigError, match="unknown dtype"):
        sizing.ModelGeometry.from_config({**base, "torch_dtype": "int3"})


def test_parameter_counts_match_the_published_sizes():
    # Qwen3-4B by hand: attention 2*2560*32*128 + 2*2560*8*128, MLP 3*2560*9728, 36 layers, tied embeddings.
    per_layer = 2 * 2560 * 32 * 128 + 2 * 2560 * 8 * 128 + 3 * 2560 * 9728
    assert QWEN3_4B.num_active_params == 36 * per_layer == 3_633_315_840
    assert QWEN3_4B.num_params == 36 * per_layer + 151936 * 2560
    assert QWEN3_4B.weight_bytes == 2 * QWEN3_4B.num_params
    ds = geometry("DeepSeek-V3")  # published: 671B total, 37B activated (with embeddings)
    assert 665e9 < ds.num_params < 675e9
    assert 34e9 < ds.num_active_params < 38e9
    assert ds.weight_bytes == ds.num_params  # fp8 weights
    for model_id in BUILTIN_CONFIGS:
        assert geometry(model_id).num_params > 0


def test_prefill_flops_are_linear_plus_causal_attention():
    n = 20_128
    assert QWEN3_4B.prefill_flops(n) == 2 * 3_633_315_840 * n + 36 * 32 * (128 + 128) * n * n


def test_design_md_h100_figures():
    per_token = QWEN3_4B.kv_bytes_per_token()
    assert per_token * 20_000 / 1e9 == pytest.approx(2.95, abs=0.005)                    # 2.95 GB per 20K tokens
    assert sizing.onboard_seconds(20_000, per_token, 55e9) == pytest.approx(0.054, abs=0.0005)
    assert sizing.onboard_seconds(20_000, per_token, 1.8e9) == pytest.approx(1.6, abs=0.05)
    rate = sizing.flops_rate_from_prefill(QWEN3_4B, 20_128, 0.61)                          # measured prefill
    assert sizing.recompute_seconds(QWEN3_4B, 20_128, rate) == pytest.approx(0.61)
    # The default estimate (44% of H100 bf16 peak) lands on the measurement.
    estimate = sizing.GPUS["h100"].bf16_flops * 0.44
    assert sizing.recompute_seconds(QWEN3_4B, 20_128, estimate) == pytest.approx(0.61, rel=0.02)
    # From host memory KVBM always pays; from that disk never, within Qwen3-4B's 40,960-token context.
    assert sizing.break_even_tokens(QWEN3_4B, per_token, 55e9, rate, QWEN3_4B.max_context) == 1
    assert sizing.break_even_tokens(QWEN3_4B, per_token, 1.8e9, rate, QWEN3_4B.max_context) is None
    # Without the context limit the quadratic attention term makes disk pay eventually, far beyond it.
    assert sizing.break_even_tokens(QWEN3_4B, per_token, 1.8e9, rate, None) > 40_960


@settings(max_examples=200, deadline=None)
@given(gbps=st.floats(0.2, 100), frac=st.floats(0.05, 1.0))
def test_break_even_is_the_first_length_where_onboarding_wins(gbps, frac):
    bandwidth, rate = gbps * 1e9, sizing.GPUS["h100"].bf16_flops * frac
    per_token = QWEN3_4B.kv_bytes_per_token()
    n = sizing.break_even_tokens(QWEN3_4B, per_token, bandwidth, rate, None)

    def wins(k: int) -> bool:
        return sizing.onboard_seconds(k, per_token, bandwidth) < sizing.recompute_seconds(QWEN3_4B, k, rate)

    assert wins(n) and wins(n * 2)
    assert n == 1 or not wins(n - 1)


def test_tier_blocks_and_gb_to_hold():
    block_bytes = 147_456 * 16
    config = KvbmConfig(cpu_cache_gb=20, disk_cache_gb=100)
    assert sizing.tier_blocks(config, block_bytes) == (20_000_000_000 // block_bytes, 100_000_000_000 // block_bytes)
    assert sizing.tier_blocks(config, block_bytes) == (8477, 42385)
    assert sizing.tier_blocks(KvbmConfig(disk_cache_gb=100), block_bytes) == (0, 0)  # disk needs a CPU tier
    assert sizing.blocks_per_prefix(20_000, 16) == 1250
    assert sizing.blocks_per_prefix(20_001, 16) == 1251
    assert sizing.gb_to_hold(5, 20_000, 16, block_bytes) == pytest.approx(5 * 1250 * block_bytes / 1e9)
    assert sizing.gb_to_hold(5, 20_000, 16, block_bytes) == pytest.approx(14.7456)


def test_gpu_kv_bytes():
    assert sizing.gpu_kv_bytes(80_000_000_000, 0.5, 8_000_000_000, 1_000_000_000) == 31_000_000_000
    assert sizing.gpu_kv_bytes(10_000_000_000, 0.2, 8_000_000_000) == 0
    with pytest.raises(ConfigError, match="gpu-util"):
        sizing.gpu_kv_bytes(10, 1.5, 0)


def test_sizing_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, kvbm.sizing; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
