"""The host memory tier (G2): one preallocated tensor of slots, pinned when CUDA is present.

For CPU engine caches slots are laid out segment-major, (num_segments, num_slots, segment_words), so that
a run of consecutive slots of one segment is one contiguous piece: the engine's scattered pages gather into
it, and scatter back out of it, in a single copy per run. For GPU engine caches they are block-major,
(num_slots, num_segments, segment_words): the pages are gathered on the GPU, and a run of consecutive slots
(or one block) is then one contiguous piece that crosses PCIe in one DMA copy.

Operations: HostTier(geometry, num_slots, block_major), HostTier.for_layout(layout, num_slots),
segment(s), read_slot(slot), nbytes
"""

from __future__ import annotations

import torch

from kvbm.errors import StorageError
from kvbm.mechanism.fileio import aligned_empty


class HostTier:
    """G2 storage. Lives in each worker process (each rank holds its own shard's bytes)."""

    def __init__(self, num_slots: int, num_segments: int, segment_words: int, word: torch.dtype = torch.int64,
                 pin: bool | None = None, block_major: bool = False):
        if num_slots <= 0:
            raise StorageError("the host tier needs at least one slot; raise DYN_KVBM_CPU_CACHE_GB")
        pin = torch.cuda.is_available() if pin is None else pin
        nbytes = num_slots * num_segments * segment_words * word.itemsize
        shape = (num_slots, num_segments, segment_words) if block_major else (num_segments, num_slots, segment_words)
        try:
            if pin:
                self.tensor = torch.empty(shape, dtype=word, pin_memory=True)  # page-aligned by CUDA
            else:  # page-aligned, so disk I/O can read and write slots in place with O_DIRECT
                self.tensor = torch.from_numpy(aligned_empty(nbytes)).view(word).view(shape)
        except (RuntimeError, MemoryError) as exc:
            raise StorageError(
                f"cannot allocate {nbytes / 1e9:.2f} GB of {'pinned ' if pin else ''}host memory for the CPU "
                f"cache ({str(exc).splitlines()[0]}); lower DYN_KVBM_CPU_CACHE_GB"
            ) from None
        self.num_slots = num_slots
        self.num_segments = num_segments
        self.segment_words = segment_words
        self.word = word
        self.pinned = pin
        self.block_major = block_major

    @classmethod
    def for_layout(cls, layout, num_slots: int, pin: bool | None = None) -> "HostTier":
        """The host tier for an engine cache: block-major when it lives on a GPU, segment-major on the CPU."""
        return cls(num_slots, layout.num_segments, layout.segment_words, layout.word, pin=pin,
                   block_major=layout.device.type == "cuda")

    @property
    def nbytes(self) -> int:
        """Bytes held by the tier."""
        return self.tensor.numel() * self.tensor.element_size()

    def segment(self, index: int) -> torch.Tensor:
        """(num_slots, segment_words) view of one segment across all slots."""
        return self.tensor[:, index] if self.block_major else self.tensor[index]

    def read_slot(self, slot: int) -> torch.Tensor:
        """A copy of one slot's bytes, (num_segments, segment_words) (tests and diagnostics)."""
        return (self.tensor[slot] if self.block_major else self.tensor[:, slot]).clone()
