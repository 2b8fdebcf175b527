"""`kvbm size`: what fits in each tier for a model, what each tier needs, and whether onboarding pays (the numbers
are kvbm_cli.size.plan's; this module renders them, or prints them as JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kvbm import sizing
from kvbm.config import BYTES_PER_GB, KvbmConfig
from kvbm_cli import size as sizing_plan
from kvbm_cli._errors import CliError
from kvbm_cli._options import JsonOpt, ModelOpt
from kvbm_cli._output import emit_json, note, out, table
from kvbm_cli.tiny_model import default_model_dir


def _gb(n: float) -> str:
    return f"{n / BYTES_PER_GB:,.2f} GB"


def _render(r: dict[str, Any]) -> None:
    console, m = out(), r["model"]
    shape = (f"MLA latent {m['mla_latent_dim']} x {m['num_layers']} layers" if m["mla_latent_dim"] else
             f"{m['attention']}, {m['num_layers']} layers x {r['kv_heads_per_rank']} KV heads x {m['head_dim']}")
    console.print(table(f"KV cache of {m['name']} ({shape}, {r['kv_dtype']}, tp {r['tp']})", ["quantity", "value>"], [
        ("KV bytes per token" + (" (per rank)" if r["tp"] > 1 else ""),
         f"{r['kv_bytes_per_token']:,} ({r['kv_bytes_per_token'] / 1024:,.1f} KiB)"),
        (f"KV bytes per block ({r['block_size']} tokens)",
         f"{r['kv_bytes_per_block']:,} ({r['kv_bytes_per_block'] / 2**20:,.2f} MiB)"),
        (f"one prefix of {r['prefix_len']:,} tokens", _gb(r["prefix_bytes"])),
        ("model weights (per rank)", _gb(r["gpu"]["weight_bytes_per_rank"]))]))
    console.print(table(f"Tiers (per rank; prefixes of {r['prefix_len']:,} tokens)",
                        ["tier", "size>", "blocks>", "tokens>", "prefixes>", "setting"],
                        [(t["tier"].upper(), _gb(t["bytes"]), f"{t['num_blocks']:,}", f"{t['num_tokens']:,}",
                          f"{t['num_prefixes']:,}", t["setting"]) for t in r["tiers"]]))
    g, gpu_tier = r["gpu"], r["tiers"][0]
    console.print(f"GPU memory  = Model Size + Active Blocks x Block Size = {_gb(g['weight_bytes_per_rank'])} + "
                  f"{gpu_tier['num_blocks']:,} x {r['kv_bytes_per_block'] / 1e6:,.2f} MB = "
                  f"{_gb(g['weight_bytes_per_rank'] + gpu_tier['num_blocks'] * r['kv_bytes_per_block'])} "
                  f"of {_gb(g['memory_bytes'])} x {g['utilization']:g}")
    for t in r["tiers"][1:]:
        label = "CPU memory " if t["tier"] == "cpu" else "Disk space "
        console.print(f"{label} = {t['setting']} = {_gb(t['bytes'])}")
    prefixes = r["total_tokens"] // r["prefix_len"]
    console.print(f"Total KV capacity = GPU + CPU + Disk = {r['total_tokens']:,} tokens "
                  f"({prefixes:,} prefixes of {r['prefix_len']:,}; the workload has {r['num_prefixes']:,})")

    if "fit" in r:
        f = r["fit"]
        console.print(table(f"To hold {f['num_prefixes']:,} prefixes of {f['prefix_len']:,} tokens in one tier",
                            ["tier", "needs>", "setting"], [
            ("GPU", f"{f['gpu_memory_gb']:,.2f} GB", f"--gpu-memory-utilization {f['gpu_utilization']:.2f}"
             + (" (more than the GPU has)" if f["gpu_utilization"] > 1 else "")),
            ("CPU", f"{f['cpu_cache_gb']:,.2f} GB", f"DYN_KVBM_CPU_CACHE_GB={f['cpu_cache_gb']:.1f}"),
            ("Disk", f"{f['disk_cache_gb']:,.2f} GB", f"DYN_KVBM_DISK_CACHE_GB={f['disk_cache_gb']:.1f}")]))

    be = table(f"Onboard or recompute a {r['prefix_len']:,}-token prefix ({r['compute']['source']})",
               ["tier", "bandwidth>", "onboard>", "recompute>", "speedup>", "pays from>", "bandwidth from"])
    for b in r["break_even"]:
        pays = "every length" if b["pays_from_tokens"] == 1 else ("never" if b["pays_from_tokens"] is None
                                                                  else f"{b['pays_from_tokens']:,} tokens")
        be.add_row(f"{b['tier'].upper()} -> GPU", f"{b['bytes_per_s'] / 1e9:,.1f} GB/s", f"{b['onboard_s']:.3f} s",
                   f"{b['recompute_s']:.3f} s", f"{b['speedup']:.2f}x", pays, b["bandwidth_source"])
    console.print(be)
    for b in r["break_even"]:
        console.print(b["verdict"])


def size(
    model: ModelOpt = None,
    dtype: Annotated[str, typer.Option(help="KV cache dtype: auto (the model's), bf16, fp16, fp32, fp8.")] = "auto",
    block_size: Annotated[int, typer.Option(min=1, help="Tokens per KV block.")] = 16,
    tp: Annotated[int, typer.Option(help="Tensor-parallel GPUs; KV heads are split across them.")] = 1,
    gpu: Annotated[str, typer.Option(help=f"GPU kind: {', '.join(sizing.GPUS)}.")] = "h100",
    gpu_mem_gb: Annotated[Optional[float], typer.Option(help="GPU memory in GB (default: the GPU kind's).")] = None,
    gpu_util: Annotated[float, typer.Option(help="vLLM's --gpu-memory-utilization.")] = 0.9,
    gpu_kv_gb: Annotated[Optional[float], typer.Option(help="GPU KV memory per rank in GB, from vLLM's log (skips the estimate).")] = None,
    cpu_gb: Annotated[Optional[float], typer.Option(help="CPU tier GB per rank (default: DYN_KVBM_CPU_CACHE_GB).")] = None,
    cpu_blocks: Annotated[Optional[int], typer.Option(help="CPU tier in blocks (like DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS).")] = None,
    disk_gb: Annotated[Optional[float], typer.Option(help="Disk tier GB per rank (default: DYN_KVBM_DISK_CACHE_GB).")] = None,
    disk_blocks: Annotated[Optional[int], typer.Option(help="Disk tier in blocks (like DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS).")] = None,
    prefix_len: Annotated[int, typer.Option(min=1, help="Tokens per shared prefix.")] = 20000,
    num_prefixes: Annotated[int, typer.Option(min=1, help="Distinct prefixes the workload cycles through.")] = 5,
    fit_prefixes: Annotated[Optional[int], typer.Option(min=1, help="Reverse: GB each tier needs to hold this many prefixes.")] = None,
    h2d_gbps: Annotated[Optional[float], typer.Option(help="Pinned host->GPU GB/s (default: the GPU kind's).")] = None,
    disk_read_gbps: Annotated[Optional[float], typer.Option(help="Disk read GB/s (default: --doctor-json, else 1.8 assumed).")] = None,
    doctor_json: Annotated[Optional[Path], typer.Option(help="`kvbm doctor disk --json` output to take the disk bandwidth from.")] = None,
    prefill_tps: Annotated[Optional[float], typer.Option(help="Measured prefill tokens/s at --prefix-len (calibrates recompute).")] = None,
    mfu: Annotated[float, typer.Option(help="Fraction of GPU peak a prefill reaches, when --prefill-tps is not given.")] = sizing_plan.DEFAULT_MFU,
    as_json: JsonOpt = False,
) -> None:
    """What fits in each tier, what each tier needs, and whether onboarding beats recompute."""
    for name, value in (("--cpu-gb", cpu_gb), ("--disk-gb", disk_gb), ("--cpu-blocks", cpu_blocks), ("--disk-blocks", disk_blocks),
                        ("--h2d-gbps", h2d_gbps), ("--disk-read-gbps", disk_read_gbps), ("--prefill-tps", prefill_tps)):
        if value is not None and value < 0:
            raise CliError(f"{name} {value} must not be negative")
    if not 0 < mfu <= 1:
        raise CliError(f"--mfu {mfu} must be in (0, 1]")
    env = KvbmConfig.from_env(check_paths=False)  # checked even when the flags below replace it
    given = {k: v for k, v in (("cpu_cache_gb", cpu_gb), ("cpu_cache_override_num_blocks", cpu_blocks),
                               ("disk_cache_gb", disk_gb), ("disk_cache_override_num_blocks", disk_blocks))
             if v is not None}
    kvbm = KvbmConfig(**given) if given else env
    if not given and env.host_requested:
        note("tier sizes from DYN_KVBM_* in the environment")
    disk_source = "given"
    if doctor_json is not None and disk_read_gbps is None:
        disk_read_gbps, disk_source = sizing_plan.read_doctor_json(doctor_json) / BYTES_PER_GB, f"measured ({doctor_json.name})"
    result = sizing_plan.plan(model or str(default_model_dir()), kv_dtype=dtype, block_size=block_size, tp=tp,
                              gpu=gpu, gpu_mem_gb=gpu_mem_gb, gpu_util=gpu_util, gpu_kv_gb=gpu_kv_gb, kvbm=kvbm,
                              prefix_len=prefix_len, num_prefixes=num_prefixes, fit_prefixes=fit_prefixes,
                              h2d_gbps=h2d_gbps, disk_read_gbps=disk_read_gbps, disk_source=disk_source,
                              prefill_tps=prefill_tps, mfu=mfu)
    if as_json:
        emit_json(result)
        return
    _render(result)
    if disk_read_gbps is None:
        note("disk bandwidth assumed; measure it: kvbm doctor disk --dir DIR --json > disk.json, then pass "
             "--doctor-json disk.json")
