"""The engine's first process: it dies with its launcher and takes the engine's whole process group along.

`python -m kvbm_cli._reaper ARGV...` runs ARGV (vLLM's API server) in its own process group, which the launcher
made with a new session. The launcher's death reaches it as SIGTERM (Linux's parent-death signal, set before
exec by `die_with_parent`), and so does Engine.stop(); either way it sends SIGTERM to the whole group (API
server, engine core, workers: vLLM's children do not watch their parent), SIGKILL to what is left after a
grace period, and exits with the engine's status (128 + N for a signal N).

Operations:
  die_with_parent(sig, parent)   a preexec_fn: prctl(PR_SET_PDEATHSIG, sig); `sig` at once if the parent is gone
  supervise(argv)                run argv, stop its group as above, return the exit status
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys

import psutil

PR_SET_PDEATHSIG = 1
GRACE_S = 20.0


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None):
    """A preexec_fn for Popen: the child gets `sig` when the process that started it dies."""
    def preexec() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if parent is not None and os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), sig)
    return preexec


def _stop(signum, frame):
    # The first stop signal wins: another one (the parent-death signal and the launcher's own SIGTERM can both
    # come) must not interrupt the group's clean-up half-way, which would orphan the engine.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _stop_group(child: subprocess.Popen) -> None:
    """SIGTERM every process of this group but this one; SIGKILL the rest after GRACE_S."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    group, me = os.getpgrp(), os.getpid()

    def members() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):  # it exited meanwhile
                if p.pid != me and os.getpgid(p.pid) == group and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
        return found

    os.killpg(group, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=GRACE_S)
    psutil.wait_procs(members(), timeout=2)
    for p in members():
        with contextlib.suppress(psutil.Error):
            p.kill()
    child.poll()


def supervise(argv: list[str]) -> int:
    """Run `argv` until it exits or this process is told to stop; then clear the group; the exit status."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    child = subprocess.Popen(argv)
    with contextlib.suppress(KeyboardInterrupt):  # _stop: this process was told to stop
        child.wait()
    _stop_group(child)
    code = child.returncode if child.returncode is not None else -signal.SIGTERM
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1:]))
