"""The host memory tier (G2): one preallocated tensor of slots, pinned when CUDA is present.

For CPU engine caches slots are laid out segment-major, (num_segments, num_slots, segment_words), so that
a run of consecutive slots of one segment is one contiguous piece: the engine's scattered pages gather into
it, and scatter back out of it, in a single copy per run. For GPU engine caches they are block-major,
(num_slots, num_segments, segment_words): the pages are gathered on the GPU, and a run of consecutive slots
(or one block) is then one contiguous piece that crosses PCIe in one DMA copy.

The tier is allocated and touched (pre-faulted) at start-up, after checking that the memory is there (the
machine's and the container's cgroup limit), so a DYN_KVBM_CPU_CACHE_GB larger than the machine can hold
stops start-up with one line instead of an out-of-memory kill under load.

Operations: HostTier(geometry, num_slots, block_major), HostTier.for_layout(layout, num_slots),
segment(s), read_slot(slot), nbytes; available_memory_bytes()
"""

from __future__ import annotations

import mmap
import time
from pathlib import Path

import psutil
import torch

from kvbm.errors import StorageError

_PAGE = 4096
_TOUCH_CHUNK = 256 << 20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+: fault pages in without traps


def available_memory_bytes() -> int:
    """Memory this process can still take: the machine's available memory, capped by a cgroup v2/v1 limit."""
    avail = psutil.virtual_memory().available
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            avail = min(avail, max(0, int(limit) - usage))
        break
    return avail


def _too_big(nbytes: int, avail: int) -> StorageError:
    return StorageError(f"DYN_KVBM_CPU_CACHE_GB asks for {nbytes / 1e9:.2f} GB of host memory per worker but only "
                        f"{avail / 1e9:.2f} GB is available here; lower DYN_KVBM_CPU_CACHE_GB "
                        f"(e.g. DYN_KVBM_CPU_CACHE_GB={max(0.1, round(avail * 0.8 / 1e9, 1))})")


class HostTier:
    """G2 storage. Lives in each worker process (each rank holds its own shard's bytes)."""

    def __init__(self, num_slots: int, num_segments: int, segment_words: int, word: torch.dtype = torch.int64,
                 pin: bool | None = None, block_major: bool = False, prefault_timeout_s: float | None = None):
        if num_slots <= 0:
            raise StorageError("the host tier needs at least one slot; raise DYN_KVBM_CPU_CACHE_GB")
        pin = torch.cuda.is_available() if pin is None else pin
        nbytes = num_slots * num_segments * segment_words * word.itemsize
        avail = available_memory_bytes()
        if nbytes > avail:
            raise _too_big(nbytes, avail)
        shape = (num_slots, num_segments, segment_words) if block_major else (num_segments, num_slots, segment_words)
        try:
            if pin:
                self.tensor = torch.empty(shape, dtype=word, pin_memory=True)  # page-aligned by CUDA
            else:  # anonymous mmap: page-aligned, so disk I/O can read and write slots in place with O_DIRECT
                self._mmap = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8).view(word).view(shape)
        except (RuntimeError, MemoryError) as exc:
            raise StorageError(
                f"cannot allocate {nbytes / 1e9:.2f} GB of {'pinned ' if pin else ''}host memory for the CPU "
                f"cache ({str(exc).splitlines()[0]}); lower DYN_KVBM_CPU_CACHE_GB"
            ) from None
        if not pin:  # cudaHostAlloc pins (so touches) every page itself
            self._prefault(nbytes, prefault_timeout_s)
        self.num_slots = num_slots
        self.num_segments = num_segments
        self.segment_words = segment_words
        self.word = word
        self.pinned = pin
        self.block_major = block_major

    def _prefault(self, nbytes: int, timeout_s: float | None) -> None:
        """Fault every page in now (madvise populate, else a write per page), so the memory is really there
        before serving starts."""
        pages = None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for start in range(0, nbytes, _TOUCH_CHUNK):
            length = min(_TOUCH_CHUNK, nbytes - start)
            try:
                if pages is not None:
                    raise OSError("populate unsupported")
                self._mmap.madvise(_MADV_POPULATE_WRITE, start, length)
            except OSError:  # older kernels: touch one byte per page
                pages = self.tensor.view(-1).view(torch.uint8).numpy() if pages is None else pages
                pages[start:start + length:_PAGE] = 0
            if deadline is not None and time.monotonic() > deadline:
                raise StorageError(f"touching {nbytes / 1e9:.2f} GB of host memory for the CPU cache took longer "
                                   f"than DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS={timeout_s:g} s; lower "
                                   f"DYN_KVBM_CPU_CACHE_GB or raise the timeout")

    @classmethod
    def for_layout(cls, layout, num_slots: int, pin: bool | None = None,
                   prefault_timeout_s: float | None = None) -> "HostTier":
        """The host tier for an engine cache: segment-major (layer by layer) on CPU and GPU alike. On an H200
        layer-wise copies reached 0.94-0.97 of raw pinned memcpy with it in both directions, against 0.83-0.93
        for G1->G2 with a block-major host tier (docs/figures/gpu_layerwise_2026-12-02.txt, part C)."""
        return cls(num_slots, layout.num_segments, layout.segment_words, layout.word, pin=pin,
                   block_major=False, prefault_timeout_s=prefault_timeout_s)

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
