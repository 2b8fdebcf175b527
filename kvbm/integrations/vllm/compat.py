"""Every vLLM-version-specific detail the connector relies on, in one place (checked against vLLM 0.32).

Operations:
  kv_geometry(vllm_config, kv_cache_config)  block size (tokens), bytes per block per rank, layers, world size
  tp_rank()                                  this worker's tensor-parallel rank
  use_recompute_on_load_failure(vllm_config) make a failed load cost a recompute, never a failed request
  model_identity(vllm_config)                what computed the KV (model, dtype, revision) for disk blocks
  cache_hit_sources(host_tokens, disk_tokens)  vLLM's CacheHitSource split, when this vLLM has it
  setup_logging()                            kvbm's log lines beside vLLM's (level from DYN_LOG, default info)
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger("kvbm.vllm")


@dataclass(frozen=True)
class Geometry:
    """The engine-side facts KVBM needs, read from vLLM's configs."""

    block_size: int     # tokens per block
    block_bytes: int    # bytes of one block across all layers, on one rank
    num_layers: int
    num_blocks: int     # engine (G1) blocks
    world_size: int


def kv_geometry(vllm_config, kv_cache_config) -> Geometry:
    """Block size and bytes per block from the KV cache config vLLM hands every connector."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"kvbm supports one KV cache group (full attention); this model has {len(groups)}")
    spec = groups[0].kv_cache_spec
    num_layers = len(groups[0].layer_names)
    parallel = vllm_config.parallel_config
    return Geometry(block_size=spec.block_size, block_bytes=spec.page_size_bytes * num_layers,
                    num_layers=num_layers, num_blocks=kv_cache_config.num_blocks,
                    world_size=parallel.tensor_parallel_size * parallel.pipeline_parallel_size)


def device_type(vllm_config) -> str:
    """The engine's device type ("cuda", "cpu", ...)."""
    device = getattr(getattr(vllm_config, "device_config", None), "device_type", None)
    return str(device or "cpu")


def tp_rank() -> int:
    """This worker's tensor-parallel rank (parallel_config.rank is 0 on every rank in 0.32)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # noqa: BLE001 - not initialised (tests): rank 0
        return 0


def use_recompute_on_load_failure(vllm_config) -> None:
    """vLLM's default kv_load_failure_policy "fail" ends a request whose load failed; a cache must recompute.

    The scheduler reads the policy right after building the connector, so setting it here takes effect.
    """
    ktc = vllm_config.kv_transfer_config
    if getattr(ktc, "kv_load_failure_policy", "recompute") != "recompute":
        log.info("kvbm: setting kv_load_failure_policy=recompute: a failed KVBM load is recomputed, not an error")
        ktc.kv_load_failure_policy = "recompute"


def model_identity(vllm_config) -> str:
    """Model, revision, dtype and cache dtype: part of every disk block's fingerprint."""
    mc = vllm_config.model_config
    return f"{mc.model}|{getattr(mc, 'revision', None)}|{mc.dtype}|{vllm_config.cache_config.cache_dtype}"


def cache_hit_sources(host_tokens: int, disk_tokens: int, remote_tokens: int = 0) -> dict:
    """{CacheHitSource.HOST: n, CacheHitSource.DISK: m, ...} for vllm:prompt_tokens_cached_by_source (vLLM has
    no remote-store source: shared-tier tokens are EXTERNAL_UNSPECIFIED)."""
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    out = {}
    if host_tokens:
        out[CacheHitSource.HOST] = host_tokens
    if disk_tokens:
        out[CacheHitSource.DISK] = disk_tokens
    if remote_tokens:
        out[CacheHitSource.EXTERNAL_UNSPECIFIED] = remote_tokens
    return out


def setup_logging() -> None:
    """Give the "kvbm" logger a handler in vLLM's processes (vLLM configures only its own logger)."""
    logger = logging.getLogger("kvbm")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [kvbm pid=%(process)d] %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    level = os.environ.get("DYN_LOG", "info").split(",")[0].upper()
    logger.setLevel(level if level in ("DEBUG", "INFO", "WARNING", "WARN", "ERROR") else "INFO")
    logger.propagate = False
