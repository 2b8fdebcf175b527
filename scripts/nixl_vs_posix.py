"""Compare the disk tier's two I/O paths: NixlDiskIO (NIXL POSIX backend) and PosixDiskIO (thread pool).

Writes then reads back 256 MiB (by default) of random slots at scattered offsets of a fresh preallocated
file, checks the bytes, and prints GB/s and process CPU seconds for each; rounds alternate the order so
neither always pays the first-writer costs (page cache, unwritten extents). Not a test: numbers vary.

  .venv/bin/python scripts/nixl_vs_posix.py [--dir DIR] [--mib 256] [--slot-kib 2048] [--buffered] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from kvbm.mechanism.fileio import PosixDiskIO, aligned_empty, open_cache_file, preallocate
from kvbm.mechanism.nixl_io import NixlDiskIO, load_nixl


def run_once(io, directory: Path, src: np.ndarray, slot: int, direct: bool,
             seed: int) -> tuple[float, float, float, float]:
    """(write GB/s, write CPU s, read GB/s, read CPU s) of one backend on a fresh file."""
    n = src.size // slot
    offsets = np.random.default_rng(seed).permutation(2 * n)[:n] * slot  # scattered, half the file unused
    dst = aligned_empty(src.size)
    dst[:] = 0
    if hasattr(io, "register_buffer"):  # what the disk tier does for its long-lived buffers
        io.register_buffer(src)
        io.register_buffer(dst)
    path = directory / f"kvbm-io-compare-{io.name}-{os.getpid()}.bin"
    fd = open_cache_file(path, direct)
    try:
        preallocate(fd, 2 * src.size, zerofill=True)
        c0, t0 = time.process_time(), time.perf_counter()
        io.write(fd, [(int(offsets[i]), src[i * slot:(i + 1) * slot]) for i in range(n)])
        os.fsync(fd)
        c1, t1 = time.process_time(), time.perf_counter()
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from disk, not the page cache
        c2, t2 = time.process_time(), time.perf_counter()
        io.read(fd, [(int(offsets[i]), dst[i * slot:(i + 1) * slot]) for i in range(n)])
        c3, t3 = time.process_time(), time.perf_counter()
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    if not np.array_equal(src, dst):
        raise SystemExit(f"{io.name}: bytes read back differ from bytes written")
    return src.size / (t1 - t0) / 1e9, c1 - c0, src.size / (t3 - t2) / 1e9, c3 - c2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="directory on the disk to test (default: temp dir)")
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--slot-kib", type=int, default=2048, help="bytes per slot (one descriptor / pwrite each)")
    parser.add_argument("--buffered", action="store_true", help="without O_DIRECT")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if load_nixl() is None:
        raise SystemExit("NIXL is not installed here (nixl / nixl_cu13 / nixl_cu12); nothing to compare")
    slot = args.slot_kib * 1024
    src = aligned_empty(args.mib * 1024 * 1024 // slot * slot)
    src[:] = np.random.default_rng(0).integers(0, 256, src.size, dtype=np.uint8)
    direct = not args.buffered
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"{src.size >> 20} MiB in {src.size // slot} slots of {args.slot_kib} KiB, "
              f"{'O_DIRECT' if direct else 'buffered'}, in {args.dir or Path(tmp).parent}")
        for r in range(args.rounds):
            makers = [NixlDiskIO, PosixDiskIO] if r % 2 == 0 else [PosixDiskIO, NixlDiskIO]
            for make in makers:
                io = make()
                try:
                    w, wc, rd, rc = run_once(io, Path(tmp), src, slot, direct, seed=r)
                finally:
                    io.close()
                print(f"  round {r + 1} {io.name:5s}  write {w:6.2f} GB/s (cpu {wc:5.2f} s)   "
                      f"read {rd:6.2f} GB/s (cpu {rc:5.2f} s)")


if __name__ == "__main__":
    main()
