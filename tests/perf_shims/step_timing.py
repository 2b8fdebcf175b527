"""Per-call means of the perf shim's counters between two times: step_timing.py KVBM_PROF_DIR T0 T1 (epoch s)."""

import glob
import json
import os
import sys


def deltas(prof_dir: str, t0: float, t1: float) -> dict[str, dict[str, tuple[int, float, float]]]:
    """pid -> name -> (calls, mean wall us, mean CPU us) between the snapshots nearest t0 and t1."""
    out = {}
    for path in glob.glob(os.path.join(prof_dir, "*.jsonl")):
        snaps = [json.loads(line) for line in open(path)]
        before = [s for s in snaps if s["t"] <= t0] or [{"stats": {}}]
        after = [s for s in snaps if s["t"] <= t1]
        if not after:
            continue
        a, b = before[-1]["stats"], after[-1]["stats"]
        rows = {}
        for name, counts in b.items():
            if len(counts) != 3:  # a wall-time histogram (".hist"), read with histograms()
                continue
            n, wall, cpu = counts
            n0, wall0, cpu0 = a.get(name, (0, 0, 0))
            if n > n0:
                rows[name] = (n - n0, (wall - wall0) / (n - n0) / 1e3, (cpu - cpu0) / (n - n0) / 1e3)
        out[os.path.basename(path).split(".")[0]] = rows
    return out


if __name__ == "__main__":
    for pid, rows in deltas(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])).items():
        print(f"pid {pid}")
        for name, (n, wall, cpu) in sorted(rows.items()):
            print(f"  {name:45s} calls {n:7d}  wall {wall:9.1f} us  cpu {cpu:9.1f} us")
