"""`kvbm size`: what fits in each tier for a model, what each tier needs, and whether onboarding pays.

Operations:
  size(...)          the command: KV bytes per token and block, blocks/tokens/prefixes per tier, the seed's
                     memory formula filled in, break-even of CPU and disk against recompute; --json for tools
  plan(...)          the same result as a dict (what --json prints), built from kvbm.sizing
  read_doctor_json   the disk read bandwidth `kvbm doctor disk --json` measured
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from kvbm import sizing
from kvbm.config import BYTES_PER_GB, KvbmConfig
from kvbm_cli._options import JsonOpt, ModelOpt
from kvbm_cli._output import err, out
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


def _default_model() -> Path:
    """The embedded default model's directory (made once by `kvbm model tiny`)."""
    try:
        from kvbm_cli.tiny_model import default_model_dir
    except ModuleNotFoundError as exc:
        if exc.name != "kvbm_cli.tiny_model":
            raise
        raise CliError("no embedded default model in this install; pass --model (e.g. --model Qwen/Qwen3-4B)") from None
    return default_model_dir()


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
    for name, value in (("--block-size", block_size), ("--prefix-len", prefix_len), ("--num-prefixes", num_prefixes)):
        if value < 1:
            raise CliError(f"{name} {value} must be 1 or more")
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
    if host_blocks:
        setting = (f"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS={kvbm.cpu_cache_override_num_blocks}"
                   if kvbm.cpu_cache_override_num_blocks is not None else f"DYN_KVBM_CPU_CACHE_GB={kvbm.cpu_cache_gb:g}")
        tiers.append(_tier("cpu", host_blocks * block_bytes, host_blocks, block_size, prefix_len, setting))
    if disk_blocks:
        setting = (f"DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS={kvbm.disk_cache_override_num_blocks}"
                   if kvbm.disk_cache_override_num_blocks is not None else f"DYN_KVBM_DISK_CACHE_GB={kvbm.disk_cache_gb:g}")
        tiers.append(_tier("disk", disk_blocks * block_bytes, disk_blocks, block_size, prefix_len, setting))

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
        if fit_prefixes < 1:
            raise CliError(f"--fit-prefixes {fit_prefixes} must be 1 or more")
        need = sizing.gb_to_hold(fit_prefixes, prefix_len, block_size, block_bytes)
        gpu_need = weights_rank + BYTES_PER_GB + need * BYTES_PER_GB
        result["fit"] = {"num_prefixes": fit_prefixes, "prefix_len": prefix_len, "kv_gb_per_rank": need,
                         "gpu_memory_gb": gpu_need / BYTES_PER_GB, "gpu_utilization": gpu_need / gpu_mem,
                         "cpu_cache_gb": need, "disk_cache_gb": need}
    return result


def _gb(n: float) -> str:
    return f"{n / BYTES_PER_GB:,.2f} GB"


def _render(r: dict[str, Any]) -> None:
    console, m = out(), r["model"]
    shape = (f"MLA latent {m['mla_latent_dim']} x {m['num_layers']} layers" if m["mla_latent_dim"] else
             f"{m['attention']}, {m['num_layers']} layers x {r['kv_heads_per_rank']} KV heads x {m['head_dim']}")
    head = Table(title=f"KV cache of {m['name']} ({shape}, {r['kv_dtype']}, tp {r['tp']})", title_justify="left")
    head.add_column("quantity")
    head.add_column("value", justify="right")
    head.add_row("KV bytes per token" + (" (per rank)" if r["tp"] > 1 else ""),
                 f"{r['kv_bytes_per_token']:,} ({r['kv_bytes_per_token'] / 1024:,.1f} KiB)")
    head.add_row(f"KV bytes per block ({r['block_size']} tokens)",
                 f"{r['kv_bytes_per_block']:,} ({r['kv_bytes_per_block'] / 2**20:,.2f} MiB)")
    head.add_row(f"one prefix of {r['prefix_len']:,} tokens", _gb(r["prefix_bytes"]))
    head.add_row("model weights (per rank)", _gb(r["gpu"]["weight_bytes_per_rank"]))
    console.print(head)

    tiers = Table(title=f"Tiers (per rank; prefixes of {r['prefix_len']:,} tokens)", title_justify="left")
    for col in ("tier", "size", "blocks", "tokens", "prefixes", "setting"):
        tiers.add_column(col, justify="left" if col in ("tier", "setting") else "right")
    for t in r["tiers"]:
        tiers.add_row(t["tier"].upper(), _gb(t["bytes"]), f"{t['num_blocks']:,}", f"{t['num_tokens']:,}",
                      f"{t['num_prefixes']:,}", t["setting"])
    console.print(tiers)
    g = r["gpu"]
    gpu_tier = r["tiers"][0]
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
        fit = Table(title=f"To hold {f['num_prefixes']:,} prefixes of {f['prefix_len']:,} tokens in one tier",
                    title_justify="left")
        fit.add_column("tier")
        fit.add_column("needs", justify="right")
        fit.add_column("setting")
        fit.add_row("GPU", f"{f['gpu_memory_gb']:,.2f} GB", f"--gpu-memory-utilization {f['gpu_utilization']:.2f}"
                    + (" (more than the GPU has)" if f["gpu_utilization"] > 1 else ""))
        fit.add_row("CPU", f"{f['cpu_cache_gb']:,.2f} GB", f"DYN_KVBM_CPU_CACHE_GB={f['cpu_cache_gb']:.1f}")
        fit.add_row("Disk", f"{f['disk_cache_gb']:,.2f} GB", f"DYN_KVBM_DISK_CACHE_GB={f['disk_cache_gb']:.1f}")
        console.print(fit)

    be = Table(title=f"Onboard or recompute a {r['prefix_len']:,}-token prefix ({r['compute']['source']})",
               title_justify="left")
    for col in ("tier", "bandwidth", "onboard", "recompute", "speedup", "pays from", "bandwidth from"):
        be.add_column(col, justify="left" if col in ("tier", "bandwidth from") else "right")
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
    block_size: Annotated[int, typer.Option(help="Tokens per KV block.")] = 16,
    tp: Annotated[int, typer.Option(help="Tensor-parallel GPUs; KV heads are split across them.")] = 1,
    gpu: Annotated[str, typer.Option(help=f"GPU kind: {', '.join(sizing.GPUS)}.")] = "h100",
    gpu_mem_gb: Annotated[Optional[float], typer.Option(help="GPU memory in GB (default: the GPU kind's).")] = None,
    gpu_util: Annotated[float, typer.Option(help="vLLM's --gpu-memory-utilization.")] = 0.9,
    gpu_kv_gb: Annotated[Optional[float], typer.Option(help="GPU KV memory per rank in GB, from vLLM's log (skips the estimate).")] = None,
    cpu_gb: Annotated[Optional[float], typer.Option(help="CPU tier GB per rank (default: DYN_KVBM_CPU_CACHE_GB).")] = None,
    cpu_blocks: Annotated[Optional[int], typer.Option(help="CPU tier in blocks (like DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS).")] = None,
    disk_gb: Annotated[Optional[float], typer.Option(help="Disk tier GB per rank (default: DYN_KVBM_DISK_CACHE_GB).")] = None,
    disk_blocks: Annotated[Optional[int], typer.Option(help="Disk tier in blocks (like DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS).")] = None,
    prefix_len: Annotated[int, typer.Option(help="Tokens per shared prefix.")] = 20000,
    num_prefixes: Annotated[int, typer.Option(help="Distinct prefixes the workload cycles through.")] = 5,
    fit_prefixes: Annotated[Optional[int], typer.Option(help="Reverse: GB each tier needs to hold this many prefixes.")] = None,
    h2d_gbps: Annotated[Optional[float], typer.Option(help="Pinned host->GPU GB/s (default: the GPU kind's).")] = None,
    disk_read_gbps: Annotated[Optional[float], typer.Option(help="Disk read GB/s (default: --doctor-json, else 1.8 assumed).")] = None,
    doctor_json: Annotated[Optional[Path], typer.Option(help="`kvbm doctor disk --json` output to take the disk bandwidth from.")] = None,
    prefill_tps: Annotated[Optional[float], typer.Option(help="Measured prefill tokens/s at --prefix-len (calibrates recompute).")] = None,
    mfu: Annotated[float, typer.Option(help="Fraction of GPU peak a prefill reaches, when --prefill-tps is not given.")] = DEFAULT_MFU,
    as_json: JsonOpt = False,
) -> None:
    """What fits in each tier, what each tier needs, and whether onboarding beats recompute."""
    for name, value in (("--cpu-gb", cpu_gb), ("--disk-gb", disk_gb), ("--cpu-blocks", cpu_blocks), ("--disk-blocks", disk_blocks),
                        ("--h2d-gbps", h2d_gbps), ("--disk-read-gbps", disk_read_gbps), ("--prefill-tps", prefill_tps)):
        if value is not None and value < 0:
            raise CliError(f"{name} {value} must not be negative")
    if not 0 < mfu <= 1:
        raise CliError(f"--mfu {mfu} must be in (0, 1]")
    if model is None:
        model = str(_default_model())
    env = KvbmConfig.from_env(check_paths=False)
    given = {"cpu_cache_gb": cpu_gb, "cpu_cache_override_num_blocks": cpu_blocks,
             "disk_cache_gb": disk_gb, "disk_cache_override_num_blocks": disk_blocks}
    if any(v is not None for v in given.values()):
        kvbm = KvbmConfig(**{k: v for k, v in given.items() if v is not None})
    else:
        kvbm = env
        if env.host_requested:
            err().print("[dim]tier sizes from DYN_KVBM_* in the environment[/dim]")
    disk_source = "given"
    if doctor_json is not None and disk_read_gbps is None:
        disk_read_gbps, disk_source = read_doctor_json(doctor_json) / BYTES_PER_GB, f"measured ({doctor_json.name})"
    result = plan(model, kv_dtype=dtype, block_size=block_size, tp=tp, gpu=gpu, gpu_mem_gb=gpu_mem_gb,
                  gpu_util=gpu_util, gpu_kv_gb=gpu_kv_gb, kvbm=kvbm, prefix_len=prefix_len, num_prefixes=num_prefixes,
                  fit_prefixes=fit_prefixes, h2d_gbps=h2d_gbps, disk_read_gbps=disk_read_gbps,
                  disk_source=disk_source, prefill_tps=prefill_tps, mfu=mfu)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _render(result)
    if disk_read_gbps is None:
        err().print("[dim]disk bandwidth assumed; measure it: kvbm doctor disk --dir DIR --json > disk.json, "
                    "then pass --doctor-json disk.json[/dim]")
