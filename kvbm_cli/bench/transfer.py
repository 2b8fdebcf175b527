"""`kvbm bench transfer`: offload/onboard throughput of each tier path against the raw copy, in one run.

Raw references move the same bytes, interleaved so machine noise hits both alike: G1<->G2 against one memcpy
(--device cuda: one pinned D2H / H2D copy), G2->G3 and G3->G1 against sequential O_DIRECT pwrite/pread.
Engine pages are scattered (a random permutation of a larger cache), laid out as vLLM lays them out: CPU, per
layer (blocks, 2, block_size, heads*head_dim); CUDA, FlashAttention's (2, blocks, block_size, heads, head_dim).

Operations:
  engine_cache(...), run_transfer_bench(...), transfer   the cache, the measured paths, the command
"""

from __future__ import annotations

import os
import sys
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Callable

import typer

from kvbm_cli._errors import CliError
from kvbm_cli._options import DiskIO, JsonOpt
from kvbm_cli._output import emit_json, note, out, table


@dataclass
class PathResult:
    """One measured path: our throughput, the raw reference's, their ratio."""

    path: str
    reference: str
    nbytes: int
    ours_gbps: float
    raw_gbps: float

    @property
    def ratio(self) -> float:
        return self.ours_gbps / self.raw_gbps if self.raw_gbps else 0.0


def engine_cache(layers: int, kv_heads: int, head_dim: int, block_size: int, num_blocks: int, device: str,
                 dtype: str = "bfloat16"):
    """Random KV in vLLM's layout for `device`: (per-layer views over one buffer, block_dim)."""
    import torch

    numel = layers * num_blocks * 2 * block_size * kv_heads * head_dim
    buf = torch.empty(numel, dtype=getattr(torch, dtype), device=device)
    buf.view(torch.uint8).random_()
    cpu = device == "cpu"  # else FlashAttention's layout
    shape = (num_blocks, 2, block_size, kv_heads * head_dim) if cpu else (2, num_blocks, block_size, kv_heads, head_dim)
    return list(buf.view(layers, *shape)), 0 if cpu else 1


def run_transfer_bench(*, layers: int, kv_heads: int, head_dim: int, block_size: int, num_blocks: int,
                       directory: Path | None, direct: bool, repeats: int, dtype: str = "bfloat16", io: str = "posix",
                       device: str = "cpu", gpu_chunk_bytes: int = 64 << 20, copy_2d: bool | None = None,
                       host_block_major: bool | None = None,
                       scattered_slots: bool = False, disk_repeats: int | None = None,
                       progress: Callable[[str], None] = lambda msg: None) -> list[PathResult]:
    """Measure every path on a cache of `layers` in vLLM's layout for `device` (see the module docstring).

    CUDA only: `gpu_chunk_bytes` (staging per chunk); `host_block_major=True` (a block-major host tier instead
    of HostTier.for_layout's segment-major one); `copy_2d=False` (one copy per segment instead of one 2D copy per
    host-slot run). `scattered_slots`: random, non-consecutive host slots.
    """
    import torch

    from kvbm.mechanism import BlockMove, DiskTier, HostTier, KVLayout, OffloadJob, OnboardJob, SlotCopy, TransferEngine
    from kvbm.mechanism import fileio
    from kvbm.policy import Tier

    cuda = device.startswith("cuda")
    cache_blocks = num_blocks * 2
    caches, block_dim = engine_cache(layers, kv_heads, head_dim, block_size, cache_blocks, device, dtype)
    layout = KVLayout.from_layers(caches, block_dim=block_dim)
    host_slots = num_blocks * 2 if scattered_slots else num_blocks
    host = HostTier(host_slots, layout.num_segments, layout.segment_words, layout.word,
                    block_major=bool(host_block_major))  # segment-major unless asked: as HostTier.for_layout
    block_ids = torch.randperm(cache_blocks)[:num_blocks].tolist()
    slots = torch.randperm(host_slots)[:num_blocks].tolist() if scattered_slots else list(range(num_blocks))
    nbytes = num_blocks * layout.block_bytes
    results: list[PathResult] = []

    # G1 <-> G2 against one copy of the same bytes (CUDA: between pinned host memory and the device).
    engine_side = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    host_side = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)

    def raw_copy(dst, src) -> Callable[[], None]:
        def go() -> None:
            dst.copy_(src, non_blocking=cuda)
            if cuda:
                torch.cuda.current_stream(device).synchronize()
        return go
    references = (("pinned D2H" if cuda else "memcpy", raw_copy(host_side, engine_side)),
                  ("pinned H2D" if cuda else "memcpy", raw_copy(engine_side, host_side)))
    engine = TransferEngine(layout, host, None, gpu_chunk_bytes=gpu_chunk_bytes)
    if cuda and copy_2d is False:
        engine.cuda.copy_per_segment()  # measure the fallback: one copy per segment per host-slot run
    stores = [BlockMove(i, b, s) for i, (b, s) in enumerate(zip(block_ids, slots))]

    def job(offload: bool, **moves) -> Callable[[], None]:
        """Run one job on the current `engine` (the disk paths make a new one) and wait for it."""
        def go() -> None:
            (engine.submit_offload if offload else engine.submit_onboard)(
                (OffloadJob if offload else OnboardJob)("bench", **moves))
            engine.wait()
        return go

    def measure(path: str, ours: Callable[[], None], reference: str, raw: Callable[[], None], n: int) -> None:
        """Median seconds of each, alternating runs after one warm-up of each."""
        progress(path)
        ours()
        raw()
        seconds: dict[Callable[[], None], list[float]] = {ours: [], raw: []}
        for _ in range(n):
            for fn in (raw, ours):
                start = time.perf_counter()
                fn()
                seconds[fn].append(time.perf_counter() - start)
        results.append(PathResult(path, reference, nbytes, nbytes / statistics.median(seconds[ours]) / 1e9,
                                  nbytes / statistics.median(seconds[raw]) / 1e9))

    measure("G1->G2 offload", job(True, stores=stores), *references[0], repeats)
    measure("G2->G1 onboard", job(False, loads=stores), *references[1], repeats)
    _close(engine)

    if directory is not None:
        disk_io = fileio.PosixDiskIO()  # positional I/O on threads, or NIXL's POSIX backend:
        if io == "nixl":
            from kvbm.mechanism.nixl_io import NixlDiskIO, nixl_available

            if not nixl_available():
                raise CliError("--io nixl: the nixl package is not installed; pip install nixl-cu13, or --io posix")
            disk_io = NixlDiskIO()
        with tempfile.TemporaryDirectory(dir=directory, prefix="kvbm-bench-") as tmp:
            tmp = Path(tmp)
            disk = DiskTier.create(tmp, num_blocks, layout.block_bytes, layout.fingerprint(model="bench"),
                                   direct=direct, io=disk_io)
            engine = TransferEngine(layout, host, disk, gpu_chunk_bytes=gpu_chunk_bytes)
            job(True, stores=stores)()  # fill the host tier
            raw_bytes = num_blocks * disk.slot_bytes  # the raw reference moves the same on-disk bytes
            raw_buf = fileio.aligned_empty(raw_bytes)
            raw_buf[:] = 1
            raw_fd = fileio.open_cache_file(tmp / "raw-reference", direct)
            fileio.preallocate(raw_fd, raw_bytes, zerofill=True)
            chunk = 64 << 20

            def raw_write():
                for off in range(0, raw_bytes, chunk):
                    os.pwrite(raw_fd, raw_buf[off:off + chunk], off)

            def raw_read():
                for off in range(0, raw_bytes, chunk):
                    os.preadv(raw_fd, [raw_buf[off:off + chunk]], off)

            measure("G2->G3 offload", job(True, cascades=[SlotCopy(i, s, i) for i, s in enumerate(slots)]),
                    "O_DIRECT write" if direct else "pwrite", raw_write, disk_repeats or repeats)
            measure("G3->G1 onboard", job(False, loads=[BlockMove(i, b, i, Tier.G3) for i, b in enumerate(block_ids)]),
                    "O_DIRECT read" if direct else "pread", raw_read, disk_repeats or repeats)
            os.close(raw_fd)
            _close(engine)
    return results


def _close(engine) -> None:
    """Close the engine; CliError (exit 1) if any of its transfers failed."""
    failed = [r for r in engine.get_finished() if not r.ok]
    engine.close()
    if failed:
        raise CliError(f"benchmark transfers failed: {failed[0].error or failed[0].failed_hashes}", 1)


def transfer(
    layers: Annotated[int, typer.Option(help="Layers of the KV geometry (tiny default model: 4).")] = 4,
    kv_heads: Annotated[int, typer.Option(help="KV heads.")] = 2,
    head_dim: Annotated[int, typer.Option(help="Head dimension.")] = 64,
    block_size: Annotated[int, typer.Option(help="Tokens per block (vLLM CPU default: 128).")] = 128,
    blocks: Annotated[int, typer.Option(min=1, help="Blocks moved per measurement.")] = 1024,
    disk_dir: Annotated[Path, typer.Option("--dir", help="Directory for the disk paths (default: DYN_KVBM_DISK_CACHE_DIR or /tmp).")] = None,
    no_disk: Annotated[bool, typer.Option("--no-disk", help="Measure only G1<->G2.")] = False,
    buffered: Annotated[bool, typer.Option("--buffered", help="Buffered I/O instead of O_DIRECT (as DYN_KVBM_DISK_DISABLE_O_DIRECT=true).")] = False,
    repeats: Annotated[int, typer.Option(min=1, help="Measurements per path (median reported).")] = 5,
    io: Annotated[DiskIO, typer.Option("--io", help="Disk I/O backend: posix (positional I/O on threads) or nixl (NIXL's POSIX backend).")] = DiskIO.posix,
    device: Annotated[str, typer.Option(help="Where the engine cache lives: cpu (vLLM CPU layout) or cuda "
                                             "(FlashAttention layout; references are pinned H2D/D2H copies).")] = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Measure offload/onboard throughput of each tier path against the raw copy of the same bytes."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CliError(f"--device {device} is not cpu or cuda")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise CliError(f"--device {device}: torch sees no CUDA GPU here (torch {torch.__version__})")
    directory = None
    if not no_disk:
        directory = disk_dir or Path(os.environ.get("DYN_KVBM_DISK_CACHE_DIR") or "/tmp")
        if not directory.is_dir():
            raise CliError(f"--dir {directory} is not a directory; create it or pass another with --dir")
    show = (lambda msg: note(f"measuring {msg} ...")) if sys.stderr.isatty() and not as_json else (lambda m: None)
    results = run_transfer_bench(layers=layers, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                                 num_blocks=blocks, directory=directory, direct=not buffered, repeats=repeats, io=io,
                                 device=device, progress=show)  # io: a str enum, equal to its value
    if as_json:
        emit_json([asdict(r) | {"ratio": r.ratio} for r in results])
        return
    nbytes = results[0].nbytes
    out().print(table(f"kvbm bench transfer ({device}): {blocks} blocks x {nbytes // blocks // 1024} KiB = "
                      f"{nbytes / 2**20:.0f} MiB per measurement, median of {repeats}",
                      ["path", "reference", "kvbm GB/s>", "raw GB/s>", "ratio>"],
                      [(r.path, r.reference, f"{r.ours_gbps:.2f}", f"{r.raw_gbps:.2f}",
                        f"[{'green' if r.ratio >= 0.8 else 'yellow'}]{r.ratio:.2f}[/]") for r in results]))
