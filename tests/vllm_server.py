"""Start a real vLLM (CPU build) OpenAI server in a subprocess for engine tests.

Operations:
  free_port()                             a TCP port free on 127.0.0.1 right now
  vllm_server(model_dir, args=, env=)     context manager: start, wait for /health, yield the base URL, stop

The server runs in its own process group (start_new_session) and the whole group is stopped at exit, so the
engine-core and worker processes vLLM forks never outlive a test module. Start one server per test module:
start-up takes about 40 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


def free_port() -> int:
    """A port nobody listens on now (the usual race applies: bind soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left after `grace_s`."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)  # workers may outlive the API server's exit
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def vllm_server(model_dir: str | os.PathLike[str], args: Sequence[str] = (), env: Mapping[str, str | None] | None = None,
                *, max_model_len: int = 16384, startup_timeout_s: float = 300.0, python: str | None = None,
                log_path: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """Run `python -m vllm.entrypoints.openai.api_server` on the model; yield "http://127.0.0.1:PORT".

    Defaults: `--load-format dummy --enforce-eager`, HF_HUB_OFFLINE=1 and VLLM_CPU_KVCACHE_SPACE=1 unless
    `env` says otherwise (a None value unsets a variable). `args` are appended. The server's output goes to
    `log_path` (a temporary file if not given); its tail is in the error when start-up fails.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full_env = dict(os.environ)
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
           "--max-model-len", str(max_model_len), *args]
    if not (Path(model_dir) / "model.safetensors").is_file():
        cmd[cmd.index("--enforce-eager"):cmd.index("--enforce-eager")] = ["--load-format", "dummy"]
    log = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not healthy after {startup_timeout_s:.0f} s"
                tail = log.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"vLLM server {why}; log {log}:\n{tail}")
            time.sleep(1.0)
        yield url
    finally:
        _stop_group(proc)
