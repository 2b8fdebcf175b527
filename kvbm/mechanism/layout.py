"""How an engine's paged KV cache lies in memory, described rather than assumed.

An engine hands kvbm one tensor per layer (vLLM 0.32: strided views over one shared buffer). Each layer
tensor has a block dimension. kvbm reads the tensor in its physical order (dimensions sorted by stride, so
vLLM's permuted layouts such as LBNHC, whose logical [B, H, N, C] view lies as [B, N, H, C], are read as the
bytes lie); the dimensions physically outside the block dimension (FlashAttention's old K/V axis, the H of
LHBNC/BHLNC) split a block's page into segments, and the dimensions inside it must be dense. kvbm moves a
block as its segments: `num_segments` pieces of `segment_bytes` each, viewed as machine words so copies run
at memcpy speed.

Operations:
  KVLayout.from_layers(layers, block_dim)   describe per-layer tensors; ValueError names what is unsupported
  KVLayout.infer_block_dim(tensor, num_blocks)  the dimension whose size is the number of blocks
  layout.segments                           one (num_blocks, segment_words) view per segment, in order
  layout.block_bytes / fingerprint()        bytes per block; identity of the geometry for disk blocks
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import xxhash

_WORD_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def word_dtype(nbytes: int) -> torch.dtype:
    """The widest integer dtype whose size divides `nbytes` (int64 for any real KV page)."""
    for dtype in _WORD_DTYPES:
        if nbytes % dtype.itemsize == 0:
            return dtype
    return torch.uint8


def physical_order(t: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of `t` from outermost to innermost in memory (by stride; size-1 dims keep their place)."""
    dims = list(range(t.dim()))
    real = sorted((d for d in dims if t.shape[d] != 1), key=lambda d: -t.stride(d))  # stable: ties keep order
    it = iter(real)
    return tuple(d if t.shape[d] == 1 else next(it) for d in dims)


def segment_order(t: torch.Tensor, block_dim: int) -> tuple[tuple[int, ...], int]:
    """(permutation, number of split dims): `t.permute(perm)` is (splits..., blocks, dense...), where the dense
    dims are the innermost ones that lie densely (the segment) and the splits are every other dim, outermost
    first. Only dims logically before the block dim may split a page (FlashAttention's old K/V axis): vLLM's
    LBHNC, LBNHC, BLHNC and BLNHC qualify, LHBNC and BHLNC (a page split per KV head) are refused."""
    order = [d for d in physical_order(t) if d != block_dim]
    dense: list[int] = []
    expected = 1
    for d in reversed(order):
        if t.shape[d] != 1 and t.stride(d) != expected:
            break
        dense.insert(0, d)
        expected *= t.shape[d]
    splits = [d for d in order if d not in dense]
    if any(d > block_dim for d in splits):
        raise ValueError(
            f"KV page is not contiguous within a block (shape {tuple(t.shape)}, strides {t.stride()}); "
            "kvbm needs each block's page in one piece (vLLM layouts LBHNC, LBNHC, BLHNC, BLNHC)")
    return tuple(splits + [block_dim] + dense), len(splits)


def _segment_view(seg: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """(num_blocks, ...) with contiguous trailing dims -> (num_blocks, segment_words) of `word`."""
    trailing = seg.shape[1:]
    expected = 1
    for size, stride in zip(reversed(trailing), reversed(seg.stride()[1:])):
        if size != 1 and stride != expected:
            raise ValueError(
                f"KV page is not contiguous within a block (shape {tuple(seg.shape)}, strides {seg.stride()}); "
                "kvbm needs each block's segment in one piece"
            )
        expected *= size
    flat = seg.reshape(seg.shape[0], -1) if seg.dim() > 1 else seg.unsqueeze(1)
    as_bytes = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    return as_bytes.view(word)


@dataclass
class KVLayout:
    """The engine's KV cache as segments of blocks. Lives in each worker process."""

    layer_names: tuple[str, ...]
    num_blocks: int
    segments: tuple[torch.Tensor, ...]   # each (num_blocks, segment_words), block-strided views of the cache
    segment_bytes: int
    word: torch.dtype
    dtype: torch.dtype
    shapes: tuple[tuple[int, ...], ...]
    block_dim: int
    order: tuple[int, ...] = ()           # physical order of the layer tensors' dims (identity when contiguous)

    @classmethod
    def from_layers(cls, layers: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], block_dim: int = 0) -> "KVLayout":
        """Describe per-layer KV tensors that share the block dimension `block_dim`."""
        if isinstance(layers, Mapping):
            names, tensors = tuple(layers.keys()), list(layers.values())
        else:
            tensors = list(layers)
            names = tuple(f"layer.{i}" for i in range(len(tensors)))
        if not tensors:
            raise ValueError("no KV cache tensors to describe")
        first = tensors[0]
        num_blocks = first.shape[block_dim]
        order, split = segment_order(first, block_dim)
        for name, t in zip(names, tensors):
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise ValueError(f"layer {name} differs from the first layer in shape, dtype or device; "
                                 "kvbm needs one geometry for all layers")
            if segment_order(t, block_dim) != (order, split):
                raise ValueError(f"layer {name} lies in memory in another order than the first layer; "
                                 "kvbm needs one layout for all layers")
        shape = [first.shape[d] for d in order]
        seg_bytes = math.prod(shape[split + 1:]) * first.element_size()
        word = word_dtype(seg_bytes)
        segments = []
        for t in tensors:
            p = t.permute(order)
            for index in itertools.product(*(range(n) for n in shape[:split])):
                segments.append(_segment_view(p[index] if index else p, word))
        return cls(names, num_blocks, tuple(segments), seg_bytes, word, first.dtype,
                   tuple(tuple(t.shape) for t in tensors), block_dim, order)

    @staticmethod
    def infer_block_dim(tensor: torch.Tensor, num_blocks: int) -> int:
        """The first dimension of `tensor` whose size is `num_blocks` (vLLM CPU: 0, FlashAttention: 1)."""
        for dim, size in enumerate(tensor.shape):
            if size == num_blocks:
                return dim
        raise ValueError(f"no dimension of size {num_blocks} (the number of blocks) in KV tensor of shape "
                         f"{tuple(tensor.shape)}")

    @property
    def num_segments(self) -> int:
        """Segments per block (layers x leading splits)."""
        return len(self.segments)

    @property
    def segment_words(self) -> int:
        """Words (of `word`) per segment."""
        return self.segment_bytes // self.word.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers."""
        return self.num_segments * self.segment_bytes

    @property
    def device(self) -> torch.device:
        """Where the engine cache lives."""
        return self.segments[0].device

    def fingerprint(self, *, model: str = "", block_size: int = 0, extra: str = "") -> bytes:
        """16 bytes naming what a stored block was computed by: model, dtype, geometry, block size."""
        text = f"{model}|{self.dtype}|{self.shapes}|{self.block_dim}|{block_size}|{extra}"
        if self.order and self.order != tuple(range(len(self.order))):  # a permuted page holds other bytes
            text += f"|order{self.order}"
        return xxhash.xxh3_128_digest(text.encode())
