"""KV caches built by vLLM 0.32's own code (needs vllm: CPU machine only), and the committed descriptions.

`vllm_kv_caches` runs the path a vLLM worker runs: `get_kv_cache_config_from_groups` (the engine core's
KVCacheTensor: layer and block strides from `compute_layout_strides`) and `allocate_kv_cache` (one int8 buffer,
`create_kv_cache_views` per layer), for a given `KVCacheLayout`. `describe` turns the result into the JSON
that kvbm.mechanism.engine_views.replay rebuilds on the device machine (which has no vllm).

Regenerate the committed file: .venv/bin/python tests/vllm_layouts.py   (writes tests/data/vllm032_layouts.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbm.mechanism.engine_views import DESCRIPTIONS, describe_views  # noqa: E402

# Qwen3-4B per rank (TP=1): 36 layers, 8 KV heads, head_dim 128, bf16.
QWEN3_4B = {"num_layers": 36, "num_kv_heads": 8, "head_size": 128}
GIB = 1 << 30
TEST_GEOMETRY = {"num_layers": 4, "num_kv_heads": 2, "head_size": 64}


def gpu_default_layout() -> str:
    """The layout vLLM 0.32 resolves on CUDA with FlashAttention and no connector preference: FlashAttention
    declares no supported layouts, so vLLM takes the first of its default preference."""
    from vllm.v1.attention.backends.utils import _DEFAULT_LAYOUT_PREFERENCE

    return _DEFAULT_LAYOUT_PREFERENCE[0].name


def vllm_kv_caches(layout_name: str, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                   head_size: int, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """(kv_cache_config, {layer name: view}) exactly as a vLLM 0.32 worker allocates them."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    layout = KVCacheLayout[layout_name]
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]
    # The fields get_kv_cache_config_from_groups reads (a full VllmConfig needs a model).
    cfg = SimpleNamespace(
        attention_config=SimpleNamespace(hisparse_config=None),
        cache_config=SimpleNamespace(get_resolved_kv_cache_layout=lambda: layout, num_gpu_blocks_override=num_blocks,
                                     prefix_cache_retention_interval=None))
    config = get_kv_cache_config_from_groups(cfg, [KVCacheGroupSpec(names, spec)],
                                             num_blocks * num_layers * spec.page_size_bytes)
    assert config.num_blocks == num_blocks
    return config, allocate_kv_cache(config, torch.device(device), layout)


def describe(name: str, layout_name: str, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
             head_size: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Build with vLLM (on the meta device: no memory) and describe."""
    from vllm.v1.kv_cache_interface import compute_layout_strides
    from vllm.v1.kv_cache_layout import KVCacheLayout

    config, views = vllm_kv_caches(layout_name, num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                                   num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype, device="meta")
    (tensor,) = config.kv_cache_tensors
    spec = config.kv_cache_groups[0].kv_cache_spec
    strides = compute_layout_strides(spec, num_blocks, num_layers, KVCacheLayout[layout_name],
                                     fixed_strides=(tensor.layer_stride, tensor.block_stride, None, None, None))
    return describe_views(name, layout_name, list(views.values()), list(views.keys()), size=tensor.size,
                          layer_stride=tensor.layer_stride, block_stride=tensor.block_stride, offset=tensor.offset,
                          strides_5d=strides, block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size)


def seed_cases() -> list[tuple[str, str, dict]]:
    """What scripts/gpu_layerwise.py replays: Qwen3-4B, the GPU default layout and the block-outermost one.
    transfer-*: 2 x 1 GiB of blocks at block sizes 16-128; ttft-*: 2 x 1258 blocks of 16 (a 20,128-token
    prompt cached twice: a G1 copy and the blocks a G2 hit onboards into) plus spare blocks; test-*: small
    caches for the GPU tests (tests/test_layerwise.py)."""
    cases = []
    page = 2 * QWEN3_4B["num_kv_heads"] * QWEN3_4B["head_size"] * 2  # bytes per token per layer
    for layout in (gpu_default_layout(), "BLHNC"):
        for bs in (16, 32, 64, 128):
            n = GIB // (QWEN3_4B["num_layers"] * page * bs)
            cases.append((f"transfer-{layout}-bs{bs}", layout, {**QWEN3_4B, "block_size": bs, "num_blocks": 2 * n}))
        cases.append((f"ttft-{layout}-bs16", layout, {**QWEN3_4B, "block_size": 16, "num_blocks": 2600}))
    for layout in (gpu_default_layout(), "BLHNC", "LBHNC"):  # small caches for tests/test_layerwise.py on a GPU
        cases.append((f"test-{layout}", layout, {**TEST_GEOMETRY, "block_size": 16, "num_blocks": 40}))
    return cases


def generate() -> dict:
    import vllm

    return {"vllm": vllm.__version__, "gpu_default_layout": gpu_default_layout(),
            "cases": [describe(name, layout, **kw) for name, layout, kw in seed_cases()]}


if __name__ == "__main__":
    DESCRIPTIONS.parent.mkdir(parents=True, exist_ok=True)
    DESCRIPTIONS.write_text(json.dumps(generate(), indent=1) + "\n")
    print(f"wrote {DESCRIPTIONS}")
