"""Keeping KVBM's background threads (transfers, disk I/O) off the engine's compute cores.

vLLM's CPU build binds each worker's OpenMP threads to a list of cores (OMP_PLACES, GOMP_CPU_AFFINITY or
KMP_AFFINITY, set by vLLM before it starts the worker process; libgomp binds the worker's main thread when it
loads). A thread started from that main thread inherits the binding, so without care KVBM's transfer threads
would run on the very cores the model's forward pass computes on. `place_background_thread()`, run first in
every KVBM thread, moves the calling thread to the cores the worker's OMP threads do not use (the cores vLLM
reserves for its scheduler and API server), so the engine's compute always keeps its cores.

Priority is left as it is by default: KVBM's threads share the worker's GIL with the engine thread, and a niced
thread that holds the GIL on the busy reserved core is descheduled with it, so the engine thread waits (measured
with tests/perf_shims at c=8, no reuse: the worker hooks waited ~170 us per step beyond their CPU time with nice
10, ~50 us with pinning alone; output tok/s 888-921 niced vs 1,144 pinned, one engine each, 2026-12-05).

KVBM_THREAD_PLACEMENT picks what is done (measured on 2 cores, see README "CPU cores"):
  auto   pin off the OMP cores when there are others (default; was "pin + nice" before session 19)
  pin    only pin off the OMP cores      nice   only lower the priority (nice 10)
  idle   SCHED_IDLE (runs only on an otherwise idle core)      off   leave the thread as started

Operations:
  omp_cpus(environ)               the cores the engine's OMP threads are bound to (None: not bound)
  allowed_cpus()                  the cores this engine may use (its parent process's affinity)
  place_background_thread(awaited)  apply KVBM_THREAD_PLACEMENT to the calling thread (Linux; no-op elsewhere);
                                  awaited=True (onboard: a request waits for it) pins but never lowers priority
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Mapping, Optional

log = logging.getLogger("kvbm.threads")

PLACEMENTS = ("auto", "pin", "nice", "idle", "off")
NICE = 10  # the engine's threads run at 0: the scheduler gives them ~10x the CPU share
_logged = False
_log_lock = threading.Lock()


def _parse_ids(text: str) -> set[int]:
    """'0-2,5' / '0 1 2' / '{0,1},{3}' -> {0, 1, 2, 5}."""
    ids: set[int] = set()
    for lo, hi in re.findall(r"(\d+)(?:-(\d+))?", text):
        ids.update(range(int(lo), int(hi or lo) + 1))
    return ids


def omp_cpus(environ: Optional[Mapping[str, str]] = None) -> Optional[set[int]]:
    """The cores vLLM bound this worker's OMP threads to, read from the variables vLLM set; None if unbound."""
    env = os.environ if environ is None else environ
    m = re.search(r"proclist=\[([^\]]*)\]", env.get("KMP_AFFINITY", ""))
    for text in (m.group(1) if m else "", env.get("GOMP_CPU_AFFINITY", ""), env.get("OMP_PLACES", "")):
        ids = _parse_ids(text) if re.search(r"\d", text) else set()
        if ids:
            return ids
    return None


def allowed_cpus() -> set[int]:
    """Cores the engine may use: the affinity of the process that started this worker (vLLM's EngineCore,
    whose affinity vLLM itself splits between OMP and its reserved cores), else this process's."""
    for pid in (os.getppid(), 0):
        try:
            return set(os.sched_getaffinity(pid))
        except OSError:
            continue
    return set(range(os.cpu_count() or 1))


def placement() -> str:
    value = os.environ.get("KVBM_THREAD_PLACEMENT", "auto").strip().lower() or "auto"
    return value if value in PLACEMENTS else "auto"


def place_background_thread(awaited: bool = False) -> None:
    """Move the calling thread off the OMP cores and/or lower its priority (KVBM_THREAD_PLACEMENT).

    `awaited`: a request waits for this thread's work (onboarding): it is pinned like the others but keeps
    normal priority, since a nice-10 load starves behind any busy process on the reserved core and its
    request's TTFT with it (seen here: 400 ms loads that take a few ms).

    Best effort: anything the OS refuses is left as it is. Threads this thread starts later inherit the
    placement (Linux copies affinity, nice and policy to new threads).
    """
    mode = placement()
    if mode == "off" or not hasattr(os, "sched_setaffinity"):
        return
    tid = threading.get_native_id()
    done = []
    if mode in ("auto", "pin"):
        omp = omp_cpus()
        if omp:
            others = allowed_cpus() - omp
            if others:
                try:
                    os.sched_setaffinity(0, others)  # 0 = the calling thread on Linux
                    done.append(f"pinned to cores {sorted(others)} (OMP uses {sorted(omp)})")
                except OSError:
                    pass
    if mode == "nice" and not awaited:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(NICE, os.getpriority(os.PRIO_PROCESS, tid)))
            done.append(f"nice {NICE}")
        except OSError:
            pass
    if mode == "idle" and not awaited and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            done.append("SCHED_IDLE")
        except OSError:
            pass
    global _logged
    with _log_lock:
        if not _logged:
            _logged = True
            log.info("kvbm: background threads %s (KVBM_THREAD_PLACEMENT=%s)", ", ".join(done) or "left as started",
                     mode)


def background_target(fn, awaited: bool = False):
    """`fn` run as a KVBM background thread's target: placed first (place_background_thread), then run."""
    def run(*args, **kwargs):
        place_background_thread(awaited)
        return fn(*args, **kwargs)

    return run
