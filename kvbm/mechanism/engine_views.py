"""vLLM 0.32's KV cache views, replayed from a plain description (no vllm import): tests and GPU benchmarks.

vLLM allocates one int8 buffer and views it per layer with `torch.as_strided` (`create_kv_cache_views`,
v1/kv_cache_interface.py): a 5D byte view in logical order [L, B, H, N, C] with the strides of its
`KVCacheLayout` (`compute_layout_strides`, layer and block strides fixed by the `KVCacheTensor`), then one
[B, H, N, C] view per layer, reinterpreted as the KV dtype. A description records what vLLM computed
(extracted on CPU by tests/test_vllm_layouts.py, committed in tests/data/vllm032_layouts.json); `replay`
builds the same views on any device, so the GPU proof moves the bytes vLLM really hands a connector.

Operations:
  describe_views(views, ...)    the JSON-able facts of vLLM-made views (shape, strides, offsets in bytes)
  replay(desc, device)          (raw int8 buffer, {layer name: view}) laid out exactly as described
  load_descriptions(path)       the committed descriptions, by name
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

DESCRIPTIONS = Path(__file__).resolve().parents[2] / "tests" / "data" / "vllm032_layouts.json"


def describe_views(name: str, layout: str, views: Sequence[torch.Tensor], layer_names: Sequence[str], *,
                   size: int, layer_stride: int, block_stride: int, offset: int, strides_5d: Sequence[int],
                   block_size: int, num_kv_heads: int, head_size: int) -> dict:
    """What vLLM built: enough to rebuild it (the 5D byte strides) and to check the rebuild (per-layer views)."""
    first = views[0]
    return {
        "name": name, "layout": layout, "dtype": str(first.dtype).removeprefix("torch."),
        "block_size": block_size, "num_kv_heads": num_kv_heads, "head_size": head_size,
        "num_layers": len(views), "num_blocks": first.shape[0], "layer_names": list(layer_names),
        "size": size, "layer_stride": layer_stride, "block_stride": block_stride, "offset": offset,
        "shape_5d_bytes": [len(views), *first.shape[:3], first.shape[3] * first.element_size()],
        "strides_5d_bytes": list(strides_5d),
        "views": [{"shape": list(v.shape), "stride": list(v.stride()),
                   "offset_bytes": v.storage_offset() * v.element_size()} for v in views],
    }


def replay(desc: dict, device: str | torch.device = "cpu", raw: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One int8 buffer of `desc["size"]` bytes and its per-layer views, as create_kv_cache_views makes them."""
    if raw is None:
        raw = torch.empty(desc["size"], dtype=torch.int8, device=device)
    dtype = getattr(torch, desc["dtype"])
    view_5d = torch.as_strided(raw, size=desc["shape_5d_bytes"], stride=desc["strides_5d_bytes"],
                               storage_offset=raw.storage_offset() + desc["offset"])
    views = {name: view_5d[i].view(dtype) for i, name in enumerate(desc["layer_names"])}
    for v, want in zip(views.values(), desc["views"]):  # the rebuild is what vLLM built, or nothing
        got = {"shape": list(v.shape), "stride": list(v.stride()), "offset_bytes": v.storage_offset() * v.element_size()}
        if got != want:
            raise ValueError(f"replayed view of {desc['name']} differs from vLLM's: {got} vs {want}")
    return raw, views


def load_descriptions(path: Path = DESCRIPTIONS) -> dict[str, dict]:
    """The committed descriptions, keyed by name."""
    return {d["name"]: d for d in json.loads(Path(path).read_text())["cases"]}
