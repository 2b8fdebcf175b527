"""`kvbm bench transfer`: offload/onboard throughput of each tier path against the raw copy, in one run.

Paths and their raw references (same bytes, measured interleaved so machine noise hits both alike):
  G1->G2 offload, G2->G1 onboard    against one contiguous memcpy (torch copy_) of the same bytes
  G2->G3 offload, G3->G1 onboard    against plain sequential O_DIRECT pwrite/pread of the same bytes
Engine pages are scattered (a random permutation of a larger cache), as in a serving engine.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Callable

import typer

from kvbm_cli._errors import CliError
from kvbm_cli.app import bench_app


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
        """ours / raw."""
        return self.ours_gbps / self.raw_gbps if self.raw_gbps else 0.0


def _interleaved(ours: Callable[[], None], raw: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median seconds of each, alternating runs after one warm-up of each."""
    ours()
    raw()
    t_ours, t_raw = [], []
    for _ in range(repeats):
        for fn, acc in ((raw, t_raw), (ours, t_ours)):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_raw)


def run_transfer_bench(*, layers: int, kv_heads: int, head_dim: int, block_size: int, num_blocks: int,
                       directory: Path | None, direct: bool, repeats: int, dtype: str = "bfloat16",
                       progress: Callable[[str], None] = lambda msg: None) -> list[PathResult]:
    """Measure every path on a vLLM-CPU-shaped cache of `layers` x (blocks, 2, block_size, kv_heads*head_dim)."""
    import torch

    from kvbm.mechanism import BlockMove, DiskTier, HostTier, KVLayout, OffloadJob, OnboardJob, SlotCopy, TransferEngine
    from kvbm.mechanism import fileio
    from kvbm.policy import Tier

    torch_dtype = getattr(torch, dtype)
    cache_blocks = num_blocks * 2
    buf = torch.empty(layers * cache_blocks * 2 * block_size * kv_heads * head_dim, dtype=torch_dtype)
    buf.view(torch.uint8).random_()
    per_layer = buf.view(layers, cache_blocks, 2, block_size, kv_heads * head_dim)
    layout = KVLayout.from_layers([per_layer[i] for i in range(layers)], block_dim=0)
    host = HostTier(num_blocks, layout.num_segments, layout.segment_words, layout.word)
    block_ids = torch.randperm(cache_blocks)[:num_blocks].tolist()
    nbytes = num_blocks * layout.block_bytes
    results: list[PathResult] = []

    # G1 <-> G2 against one memcpy of the same bytes.
    src = torch.empty(nbytes, dtype=torch.uint8)
    src.random_()
    dst = torch.empty_like(src)
    engine = TransferEngine(layout, host, None)
    stores = [BlockMove(i, b, i) for i, b in enumerate(block_ids)]

    def offload():
        engine.submit_offload(OffloadJob("bench", stores=stores))
        engine.wait()

    def onboard():
        engine.submit_onboard(OnboardJob("bench", loads=stores))
        engine.wait()

    progress("G1->G2 offload")
    ours, raw = _interleaved(offload, lambda: dst.copy_(src), repeats)
    results.append(PathResult("G1->G2 offload", "memcpy", nbytes, nbytes / ours / 1e9, nbytes / raw / 1e9))
    progress("G2->G1 onboard")
    ours, raw = _interleaved(onboard, lambda: dst.copy_(src), repeats)
    results.append(PathResult("G2->G1 onboard", "memcpy", nbytes, nbytes / ours / 1e9, nbytes / raw / 1e9))
    engine.close()

    if directory is not None:
        with tempfile.TemporaryDirectory(dir=directory, prefix="kvbm-bench-") as tmp:
            tmp = Path(tmp)
            disk = DiskTier.create(tmp, num_blocks, layout.block_bytes, layout.fingerprint(model="bench"),
                                   direct=direct)
            engine = TransferEngine(layout, host, disk)
            engine.submit_offload(OffloadJob("fill", stores=stores))
            engine.wait()
            cascades = [SlotCopy(i, i, i) for i in range(num_blocks)]
            disk_loads = [BlockMove(i, b, i, Tier.G3) for i, b in enumerate(block_ids)]
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

            def cascade():
                engine.submit_offload(OffloadJob("bench", cascades=cascades))
                engine.wait()

            def disk_onboard():
                engine.submit_onboard(OnboardJob("bench", loads=disk_loads))
                engine.wait()

            progress("G2->G3 offload")
            ours, raw = _interleaved(cascade, raw_write, repeats)
            results.append(PathResult("G2->G3 offload", "O_DIRECT write" if direct else "pwrite", nbytes,
                                      nbytes / ours / 1e9, nbytes / raw / 1e9))
            progress("G3->G1 onboard")
            ours, raw = _interleaved(disk_onboard, raw_read, repeats)
            results.append(PathResult("G3->G1 onboard", "O_DIRECT read" if direct else "pread", nbytes,
                                      nbytes / ours / 1e9, nbytes / raw / 1e9))
            failed = [r for r in engine.get_finished() if not r.ok]
            if failed:
                raise CliError(f"benchmark transfers failed: {failed[0].error or failed[0].failed_hashes}", 1)
            os.close(raw_fd)
            engine.close()
    return results


@bench_app.command("transfer")
def transfer(
    layers: Annotated[int, typer.Option(help="Layers of the KV geometry (tiny default model: 4).")] = 4,
    kv_heads: Annotated[int, typer.Option(help="KV heads.")] = 2,
    head_dim: Annotated[int, typer.Option(help="Head dimension.")] = 64,
    block_size: Annotated[int, typer.Option(help="Tokens per block (vLLM CPU default: 128).")] = 128,
    blocks: Annotated[int, typer.Option(help="Blocks moved per measurement.")] = 1024,
    disk_dir: Annotated[Path, typer.Option("--dir", help="Directory for the disk paths (default: DYN_KVBM_DISK_CACHE_DIR or /tmp).")] = None,
    no_disk: Annotated[bool, typer.Option("--no-disk", help="Measure only G1<->G2.")] = False,
    buffered: Annotated[bool, typer.Option("--buffered", help="Buffered I/O instead of O_DIRECT (as DYN_KVBM_DISK_DISABLE_O_DIRECT=true).")] = False,
    repeats: Annotated[int, typer.Option(min=1, help="Measurements per path (median reported).")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Measure offload/onboard throughput of each tier path against the raw copy of the same bytes."""
    import sys

    from rich.console import Console
    from rich.table import Table

    if blocks < 1:
        raise CliError(f"--blocks {blocks} must be at least 1")
    directory = None
    if not no_disk:
        directory = disk_dir or Path(os.environ.get("DYN_KVBM_DISK_CACHE_DIR") or "/tmp")
        if not directory.is_dir():
            raise CliError(f"--dir {directory} is not a directory; create it or pass another with --dir")
    err = Console(stderr=True)
    show = (lambda msg: err.print(f"[dim]measuring {msg} ...[/dim]")) if sys.stderr.isatty() and not as_json else (lambda m: None)
    results = run_transfer_bench(layers=layers, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                                 num_blocks=blocks, directory=directory, direct=not buffered, repeats=repeats,
                                 progress=show)
    if as_json:
        print(json.dumps([asdict(r) | {"ratio": r.ratio} for r in results], indent=2))
        return
    nbytes = results[0].nbytes
    table = Table(title=f"kvbm bench transfer: {blocks} blocks x {nbytes // blocks // 1024} KiB = "
                        f"{nbytes / 2**20:.0f} MiB per measurement, median of {repeats}")
    for col in ("path", "reference", "kvbm GB/s", "raw GB/s", "ratio"):
        table.add_column(col, justify="right" if col not in ("path", "reference") else "left")
    for r in results:
        style = "green" if r.ratio >= 0.8 else "yellow"
        table.add_row(r.path, r.reference, f"{r.ours_gbps:.2f}", f"{r.raw_gbps:.2f}", f"[{style}]{r.ratio:.2f}[/{style}]")
    Console().print(table)
