"""KV-cache sizing: bytes per token and block from a model's config.json, tier capacities, and break-even.

Pure arithmetic (no torch, no I/O), shared by `kvbm size` and the connector.

Operations:
  ModelGeometry.from_config(cfg)          layers, KV heads, head_dim or MLA latent, dtype, parameter counts
  ModelGeometry.kv_bytes_per_token(...)   KV bytes one token takes on one rank (GQA: K and V; MLA: one latent)
  ModelGeometry.prefill_flops(n)          FLOPs to prefill n tokens (linear layers plus causal attention)
  dtype_bytes(name)                       bytes per element of "bf16", "fp8", "float16", ...
  gpu_kv_bytes(...)                       vLLM's KV budget: memory x utilization - weights - overhead
  tier_blocks(config, block_bytes)        G2 and G3 slots the DYN_KVBM_* sizes give (kvbm.config's rule)
  gb_to_hold(num_prefixes, prefix_len, block_size, block_bytes)   GB a tier needs for that many prefixes
  onboard_seconds / recompute_seconds / break_even_tokens        the transfer-versus-recompute comparison
  GPUS                                    peak compute, memory and host link of common GPUs
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from kvbm.config import BYTES_PER_GB, KvbmConfig
from kvbm.errors import ConfigError

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1,
}


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype name as config.json or vLLM's --kv-cache-dtype spell it."""
    key = name.strip().lower().removeprefix("torch.")
    if key not in _DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32, fp8")
    return _DTYPE_BYTES[key]


@dataclass(frozen=True)
class GpuSpec:
    """Peak dense tensor throughput, memory (nvidia-smi's total) and pinned host<->GPU bandwidth of a GPU."""

    name: str
    memory_bytes: int
    bf16_flops: float
    fp8_flops: float | None
    h2d_bytes_per_s: float


# H100's h2d is measured on the device machine (DESIGN.md section 4); the others are their PCIe generation's
# pinned-copy figure. Peaks are the vendors' dense (no sparsity) numbers.
GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("H100 SXM 80GB", 81559 << 20, 989e12, 1979e12, 55.1e9),
    "h200": GpuSpec("H200 SXM 141GB", 143771 << 20, 989e12, 1979e12, 55.1e9),
    "b200": GpuSpec("B200 180GB", 183359 << 20, 2250e12, 4500e12, 55.1e9),
    "a100": GpuSpec("A100 SXM 80GB", 81920 << 20, 312e12, None, 25e9),
    "l40s": GpuSpec("L40S 48GB", 46068 << 20, 362e12, 733e12, 25e9),
}


def _get(cfg: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


@dataclass(frozen=True)
class ModelGeometry:
    """What fixes a model's KV size and prefill cost, read from its config.json."""

    name: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int  # K/V head size (GQA); for MLA the value head size
    hidden_size: int
    dtype: str  # the model's torch_dtype: the KV dtype under --kv-cache-dtype auto
    max_context: int | None
    mla_latent_dim: int = 0  # kv_lora_rank + qk_rope_head_dim for MLA (DeepSeek-V2/V3); 0 for GQA/MHA
    qk_head_dim: int = 0  # query/key size per head in attention (MLA: nope + rope)
    num_params: int = 0
    num_active_params: int = 0  # per token (MoE: routed experts in use), without embeddings
    weight_bytes_per_param: float = 2.0

    @property
    def attention(self) -> str:
        """"MLA", "MHA" or "GQA"."""
        if self.mla_latent_dim:
            return "MLA"
        return "MHA" if self.num_kv_heads == self.num_attention_heads else "GQA"

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights (the "Model Size" of the seed's memory formula)."""
        return int(self.num_params * self.weight_bytes_per_param)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], name: str = "model") -> "ModelGeometry":
        """Read a config.json dict (top level, or its text_config for multimodal models)."""
        if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), Mapping):
            cfg = {**cfg, **cfg["text_config"]}
        try:
            layers = int(cfg["num_hidden_layers"])
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: config.json lacks a usable {exc} field; is it a decoder LLM's config?") from None
        kv_heads = int(_get(cfg, "num_key_value_heads", default=heads))
        head_dim = int(_get(cfg, "head_dim", default=hidden // heads))
        dtype = str(_get(cfg, "torch_dtype", "dtype", default="bfloat16")).removeprefix("torch.")
        dtype_bytes(dtype)
        latent = 0
        qk_dim = head_dim
        if cfg.get("kv_lora_rank"):
            rope = int(cfg.get("qk_rope_head_dim", 64))
            latent = int(cfg["kv_lora_rank"]) + rope
            qk_dim = int(cfg.get("qk_nope_head_dim", 128)) + rope
            head_dim = int(cfg.get("v_head_dim", head_dim))
        total, active = _count_params(cfg, layers, hidden, heads, kv_heads, head_dim, qk_dim)
        return cls(name=name, num_layers=layers, num_attention_heads=heads, num_kv_heads=kv_heads,
                   head_dim=head_dim, hidden_size=hidden, dtype=dtype,
                   max_context=_get(cfg, "max_position_embeddings"), mla_latent_dim=latent, qk_head_dim=qk_dim,
                   num_params=total, num_active_params=active, weight_bytes_per_param=_weight_bytes(cfg, dtype))

    def kv_heads_per_rank(self, tp: int = 1) -> int:
        """KV heads one tensor-parallel rank stores (vLLM splits them, or replicates when tp > heads)."""
        if tp < 1:
            raise ConfigError(f"--tp {tp} must be 1 or more")
        if self.mla_latent_dim:
            return 1
        if tp <= self.num_kv_heads:
            if self.num_kv_heads % tp:
                raise ConfigError(f"--tp {tp} does not divide {self.name}'s {self.num_kv_heads} KV heads; "
                                  "vLLM needs one to divide the other")
            return self.num_kv_heads // tp
        if tp % self.num_kv_heads:
            raise ConfigError(f"--tp {tp} is not a multiple of {self.name}'s {self.num_kv_heads} KV heads")
        return 1

    def kv_bytes_per_token(self, kv_dtype: str | None = None, tp: int = 1) -> int:
        """KV bytes per token on one rank: GQA 2 x layers x heads x head_dim; MLA layers x latent (every rank)."""
        elem = dtype_bytes(kv_dtype or self.dtype)
        if self.mla_latent_dim:
            return self.num_layers * self.mla_latent_dim * elem
        return 2 * self.num_layers * self.kv_heads_per_rank(tp) * self.head_dim * elem

    def prefill_flops(self, num_tokens: int) -> float:
        """FLOPs to prefill `num_tokens` from scratch: 2 x active params x n plus causal attention."""
        n = float(num_tokens)
        attention = self.num_layers * self.num_attention_heads * (self.qk_head_dim + self.head_dim) * n * n
        return 2.0 * self.num_active_params * n + attention


def _weight_bytes(cfg: Mapping[str, Any], dtype: str) -> float:
    quant = cfg.get("quantization_config") or {}
    method = str(quant.get("quant_method", "")).lower()
    if "fp8" in method:
        return 1.0
    if quant.get("bits"):
        return int(quant["bits"]) / 8
    return float(dtype_bytes(dtype))


def _count_params(cfg: Mapping[str, Any], layers: int, hidden: int, heads: int, kv_heads: int,
                  head_dim: int, qk_dim: int) -> tuple[int, int]:
    """(total params, active params per token without embeddings) from the config's shapes."""
    if cfg.get("kv_lora_rank"):
        q_rank = cfg.get("q_lora_rank") or 0
        rope, latent = int(cfg.get("qk_rope_head_dim", 64)), int(cfg["kv_lora_rank"])
        q = hidden * q_rank + q_rank * heads * qk_dim if q_rank else hidden * heads * qk_dim
        attn = q + hidden * (latent + rope) + latent * heads * (qk_dim - rope + head_dim) + heads * head_dim * hidden
    else:
        attn = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    inter = int(_get(cfg, "intermediate_size", default=4 * hidden))
    dense_mlp = 3 * hidden * inter
    num_experts = int(_get(cfg, "n_routed_experts", "num_experts", "num_local_experts", default=0))
    total = active = layers * attn
    if num_experts:
        expert = 3 * hidden * int(_get(cfg, "moe_intermediate_size", default=inter))
        shared = int(cfg.get("n_shared_experts") or 0)
        per_tok = int(_get(cfg, "num_experts_per_tok", "num_experts_per_token", default=2))
        num_dense = min(int(cfg.get("first_k_dense_replace") or 0), layers)
        num_moe = layers - num_dense
        router = hidden * num_experts
        total += num_dense * dense_mlp + num_moe * ((num_experts + shared) * expert + router)
        active += num_dense * dense_mlp + num_moe * ((per_tok + shared) * expert + router)
    else:
        total += layers * dense_mlp
        active += layers * dense_mlp
    vocab = int(cfg.get("vocab_size") or 0)
    embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    return total + embeddings, active


def gpu_kv_bytes(gpu_memory_bytes: int, utilization: float, weight_bytes_per_rank: int,
                 overhead_bytes: int = BYTES_PER_GB) -> int:
    """vLLM's KV budget on one GPU: memory x utilization - weights - activations/graphs (estimate)."""
    if not 0 < utilization <= 1:
        raise ConfigError(f"--gpu-util {utilization} must be in (0, 1], like vLLM's --gpu-memory-utilization")
    return max(0, int(gpu_memory_bytes * utilization) - weight_bytes_per_rank - overhead_bytes)


def tier_blocks(config: KvbmConfig, block_bytes: int) -> tuple[int, int]:
    """(G2 blocks, G3 blocks) the configuration gives for blocks of `block_bytes`, as the leader computes them."""
    return config.host_num_blocks(block_bytes), config.disk_num_blocks(block_bytes)


def blocks_per_prefix(prefix_len: int, block_size: int) -> int:
    """Blocks one prefix of `prefix_len` tokens occupies (the last one may be partly full)."""
    return -(-prefix_len // block_size)


def gb_to_hold(num_prefixes: int, prefix_len: int, block_size: int, block_bytes: int) -> float:
    """GB (10^9 bytes) a tier needs to hold `num_prefixes` prefixes of `prefix_len` tokens."""
    return num_prefixes * blocks_per_prefix(prefix_len, block_size) * block_bytes / BYTES_PER_GB


def onboard_seconds(num_tokens: int, bytes_per_token: int, bytes_per_s: float) -> float:
    """Seconds to move `num_tokens` of KV at `bytes_per_s`."""
    return num_tokens * bytes_per_token / bytes_per_s


def recompute_seconds(model: ModelGeometry, num_tokens: int, flops_per_s: float) -> float:
    """Seconds to prefill `num_tokens` again at an achieved `flops_per_s`."""
    return model.prefill_flops(num_tokens) / flops_per_s


def flops_rate_from_prefill(model: ModelGeometry, num_tokens: int, seconds: float) -> float:
    """The achieved FLOP/s a measured prefill (`num_tokens` in `seconds`) implies, to calibrate the model."""
    return model.prefill_flops(num_tokens) / seconds


def break_even_tokens(model: ModelGeometry, bytes_per_token: int, bytes_per_s: float, flops_per_s: float,
                      max_tokens: int | None) -> int | None:
    """Smallest prefix length from which onboarding is faster than recompute; None when never (up to max_tokens).

    Recompute grows as a n + b n^2 (attention), onboarding as c n: onboarding wins for n > (c - a) / b.
    """
    a = 2.0 * model.num_active_params / flops_per_s
    b = model.num_layers * model.num_attention_heads * (model.qk_head_dim + model.head_dim) / flops_per_s
    c = bytes_per_token / bytes_per_s
    if c < a:
        return 1
    if b <= 0:
        return None
    n = max(1, math.floor((c - a) / b) + 1)

    def wins(k: int) -> bool:  # settle floating-point ties at the boundary with the same formulas
        return onboard_seconds(k, bytes_per_token, bytes_per_s) < recompute_seconds(model, k, flops_per_s)

    while not wins(n):
        n += 1
    while n > 1 and wins(n - 1):
        n -= 1
    return None if max_tokens is not None and n > max_tokens else n
