"""What `kvbm size` computes, from kvbm.sizing: what fits in each tier for a model, what each tier needs, whether
onboarding pays.

Operations:
  plan(...)          bytes per token and block, blocks/tokens/prefixes per tier, CPU and disk break-even against
                     recompute, as a dict (what --json prints)
  read_doctor_json   the disk read bandwidth `kvbm doctor disk --json` measured
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvbm import sizing
from kvbm.config import BYTES_PER_GB, KvbmConfig
from kvbm_cli._errors import CliError
from kvbm_cli._models import load_model_config

# Fraction of peak a prefill reaches: Qwen3-4B, 20,128 tokens in 0.61 s on an H100 (DESIGN.md section 4).
DEFAULT_MFU = 0.44
# Disk read bandwidth when neither given nor measured: the H100 machine's disk with O_DIRECT (DESIGN.md 4).
DEFAULT_DISK_READ_GBPS = 1.8


def read_doctor_json(path: Path) -> float:
    """Disk read bytes/s from `kvbm doctor disk --json` output: random KV-block reads, else sequential."""
    try:
        data = json.loads(path.read_text())
        speed = data["throughput"]
        value = speed.get("random_read_bytes_per_s") or speed["seq_read_bytes_per_s"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CliError(f"{path} is not `kvbm doctor disk --json` output with a throughput measurement; "
                       "run `kvbm doctor disk --dir DIR --json > disk.json` and pass --doctor-json disk.json") from None
    return float(value)


def _tier(name: str, total_bytes: int, num_blocks: int, block_size: int, prefix_len: int, setting: str) -> dict[str, Any]:
    return {"tier": name, "bytes": total_bytes, "num_blocks": num_blocks, "num_tokens": num_blocks * block_size,
            "num_prefixes": num_blocks // sizing.blocks_per_prefix(prefix_len, block_size), "setting": setting}


def _verdict(tier: str, where: str, pays_from: int | None, row: dict[str, Any], model: sizing.ModelGeometry) -> str:
    at = (f"at {row['prefix_len']:,} tokens onboarding takes {row['onboard_s']:.3f} s against "
          f"{row['recompute_s']:.3f} s to recompute ({row['speedup']:.1f}x)")
    if pays_from == 1:
        return f"{tier} pays for every prefix length: {at}."
    if pays_from is None:
        limit = f"up to the model's {model.max_context:,}-token context" if model.max_context else "at any length"
        return f"{tier} never pays for this model here: {at}; recompute stays faster {limit}."
    return f"{tier} pays for prefixes over {pays_from - 1:,} tokens on this {where}: {at}."


def plan(model_spec: str, *, kv_dtype: str = "auto", block_size: int = 16, tp: int = 1, gpu: str = "h100",
         gpu_mem_gb: float | None = None, gpu_util: float = 0.9, gpu_kv_gb: float | None = None,
         kvbm: KvbmConfig | None = None, prefix_len: int = 20000, num_prefixes: int = 5,
         fit_prefixes: int | None = None, h2d_gbps: float | None = None, disk_read_gbps: float | None = None,
         disk_source: str = "given", prefill_tps: float | None = None, mfu: float = DEFAULT_MFU) -> dict[str, Any]:
    """Everything `kvbm size` reports, as plain numbers (bytes, seconds, counts)."""
    if gpu.lower() not in sizing.GPUS:
        raise CliError(f"--gpu {gpu!r} is not known; use one of {', '.join(sizing.GPUS)} and --gpu-mem-gb if needed")
    spec = sizing.GPUS[gpu.lower()]
    name, cfg, source = load_model_config(model_spec)
    model = sizing.ModelGeometry.from_config(cfg, name)
    dtype = model.dtype if kv_dtype == "auto" else kv_dtype
    per_token = model.kv_bytes_per_token(dtype, tp)
    block_bytes = per_token * block_size
    kvbm = kvbm or KvbmConfig()
    if kvbm.disk_requested and not kvbm.host_requested:
        raise CliError("a disk tier needs a CPU tier: blocks reach disk through host memory; add --cpu-gb (e.g. --cpu-gb 20)")

    weights_rank = model.weight_bytes // tp
    gpu_mem = int((gpu_mem_gb * BYTES_PER_GB) if gpu_mem_gb else spec.memory_bytes)
    gpu_bytes = int(gpu_kv_gb * BYTES_PER_GB) if gpu_kv_gb is not None else sizing.gpu_kv_bytes(gpu_mem, gpu_util, weights_rank)
    host_blocks, disk_blocks = sizing.tier_blocks(kvbm, block_bytes)
    tiers = [_tier("gpu", gpu_bytes, gpu_bytes // block_bytes, block_size, prefix_len,
                   f"--gpu-memory-utilization {gpu_util:g}")]
    for tier, blocks in (("cpu", host_blocks), ("disk", disk_blocks)):
        if blocks:
            override, gb = getattr(kvbm, f"{tier}_cache_override_num_blocks"), getattr(kvbm, f"{tier}_cache_gb")
            setting = (f"DYN_KVBM_{tier.upper()}_CACHE_OVERRIDE_NUM_BLOCKS={override}" if override is not None
                       else f"DYN_KVBM_{tier.upper()}_CACHE_GB={gb:g}")
            tiers.append(_tier(tier, blocks * block_bytes, blocks, block_size, prefix_len, setting))

    peak = spec.fp8_flops if (model.weight_bytes_per_param <= 1 and spec.fp8_flops) else spec.bf16_flops
    if prefill_tps:
        flops_per_s = sizing.flops_rate_from_prefill(model, prefix_len, prefix_len / prefill_tps)
        compute_source = f"calibrated from {prefill_tps:,.0f} tokens/s at {prefix_len:,} tokens"
    else:
        flops_per_s = peak * mfu * tp
        compute_source = f"estimated: {mfu:.0%} of {spec.name} peak {peak / 1e12:,.0f} TFLOP/s x {tp} GPU"
    h2d = (h2d_gbps * BYTES_PER_GB if h2d_gbps else spec.h2d_bytes_per_s) * tp
    disk_bw = (disk_read_gbps or DEFAULT_DISK_READ_GBPS) * BYTES_PER_GB
    links = [("cpu", "host", h2d, f"{'given' if h2d_gbps else spec.name + ' pinned H2D'} x {tp}"),
             ("disk", "disk", min(disk_bw, h2d), disk_source if disk_read_gbps else "assumed (DESIGN.md H100 disk)")]
    total_per_token = per_token * tp  # what all ranks move together
    break_even = []
    for tier, where, bandwidth, bw_source in links:
        row = {"tier": tier, "bytes_per_s": bandwidth, "bandwidth_source": bw_source, "prefix_len": prefix_len,
               "onboard_s": sizing.onboard_seconds(prefix_len, total_per_token, bandwidth),
               "recompute_s": sizing.recompute_seconds(model, prefix_len, flops_per_s)}
        row["speedup"] = row["recompute_s"] / row["onboard_s"]
        row["pays_from_tokens"] = sizing.break_even_tokens(model, total_per_token, bandwidth, flops_per_s, model.max_context)
        row["verdict"] = _verdict("CPU" if tier == "cpu" else "disk", where, row["pays_from_tokens"], row, model)
        break_even.append(row)

    result: dict[str, Any] = {
        "model": {"name": name, "source": source, "attention": model.attention, "num_layers": model.num_layers,
                  "num_kv_heads": model.num_kv_heads, "head_dim": model.head_dim, "mla_latent_dim": model.mla_latent_dim,
                  "num_params": model.num_params, "weight_bytes": model.weight_bytes, "max_context": model.max_context},
        "kv_dtype": dtype, "tp": tp, "block_size": block_size, "kv_heads_per_rank": model.kv_heads_per_rank(tp),
        "kv_bytes_per_token": per_token, "kv_bytes_per_block": block_bytes,
        "gpu": {"name": spec.name, "memory_bytes": gpu_mem, "utilization": gpu_util, "weight_bytes_per_rank": weights_rank,
                "kv_bytes": gpu_bytes, "kv_bytes_source": "given" if gpu_kv_gb is not None else "estimated"},
        "prefix_len": prefix_len, "num_prefixes": num_prefixes, "tiers": tiers,
        "total_tokens": sum(t["num_tokens"] for t in tiers),
        "prefix_bytes": sizing.blocks_per_prefix(prefix_len, block_size) * block_bytes,
        "compute": {"flops_per_s": flops_per_s, "source": compute_source,
                    "recompute_s": sizing.recompute_seconds(model, prefix_len, flops_per_s)},
        "break_even": break_even,
    }
    if fit_prefixes is not None:
        need = sizing.gb_to_hold(fit_prefixes, prefix_len, block_size, block_bytes)
        gpu_need = weights_rank + BYTES_PER_GB + need * BYTES_PER_GB
        result["fit"] = {"num_prefixes": fit_prefixes, "prefix_len": prefix_len, "kv_gb_per_rank": need,
                         "gpu_memory_gb": gpu_need / BYTES_PER_GB, "gpu_utilization": gpu_need / gpu_mem,
                         "cpu_cache_gb": need, "disk_cache_gb": need}
    return result
