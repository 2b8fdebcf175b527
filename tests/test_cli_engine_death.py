"""An engine never outlives its launcher: kill -9 of the process that launched it (`kvbm serve`, `kvbm bench
compare`) takes the engine's whole process group with it, through the same Engine.start they use.

The stand-in engine is a Python process that starts a child of its own (as vLLM's API server starts its engine
core) and records both pids; the launcher is a separate process killed with SIGKILL, so no cleanup code of it
runs. Negative control: the same launch without the death signal leaves the stand-in running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STAND_IN = ("import os, subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(300)']); open(sys.argv[1], 'w').write(f'{os.getpid()} {c.pid}'); time.sleep(300)")
LAUNCHER = """
import sys, time
from kvbm_cli.engine import Engine, EngineSpec, Launch
pids, die = sys.argv[1], sys.argv[2] == "1"
launch = Launch([sys.executable, "-c", {stand_in!r}, pids], {{}}, [], [], "stand-in", "http://127.0.0.1:9",
                EngineSpec(port=0))
Engine(launch, die_with_parent=die).start()
print("started", flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _launch_and_kill(tmp_path: Path, die: bool) -> list[int]:
    pids = tmp_path / f"pids-{int(die)}"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER.format(stand_in=STAND_IN), str(pids), str(int(die))],
                                stdout=subprocess.PIPE, text=True)
    assert launcher.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 30
    while not (pids.is_file() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    engine = [int(p) for p in pids.read_text().split()]
    assert all(_alive(p) for p in engine)
    os.kill(launcher.pid, signal.SIGKILL)  # no finally, no atexit: only the kernel's parent-death signal
    launcher.wait()
    return engine


def test_sigkill_of_the_launcher_takes_the_engine_and_its_children():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        engine = _launch_and_kill(Path(tmp), die=True)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in engine) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in engine), f"engine processes {engine} outlived their launcher"


def test_without_the_death_signal_the_engine_is_orphaned(tmp_path):
    """Negative control: the same launch, no PR_SET_PDEATHSIG: the stand-in survives its launcher's SIGKILL."""
    engine = _launch_and_kill(tmp_path, die=False)
    try:
        time.sleep(3)
        assert all(_alive(p) for p in engine)
    finally:
        for pid in engine:
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in engine) and time.monotonic() < deadline:
        time.sleep(0.1)
