"""`kvbm serve` with a real vLLM CPU engine: ready then stopped by SIGTERM (whole process group), and engine
failures it can only learn from the engine (connector import error, KV cache too small, unknown model) as one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from vllm_server import free_port

pytestmark = pytest.mark.engine

KVBM = [str(Path(sys.executable).parent / "kvbm")]  # the console script, as users run it


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    return env | extra


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(KVBM + args, capture_output=True, text=True, timeout=timeout, env=_env(HF_HUB_OFFLINE="1"))


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("kvbm:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr.split(lines[0])[-1], proc.stderr[-3000:]
    return lines[0]


def _engine_pids(port: int) -> list[int]:
    """Processes whose command line has `--port PORT` (vLLM's API server, kvbm serve, the reaper)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        args = p.info["cmdline"] or []
        if any(a == "--port" and b == str(port) for a, b in zip(args, args[1:])) and p.info["status"] != "zombie":
            found.append(p.pid)
    return found


def test_serve_until_sigterm_stops_the_whole_group(tiny_model_dir, tmp_path):
    port, log = free_port(), tmp_path / "engine.log"
    proc = subprocess.Popen(KVBM + ["serve", "--model", str(tiny_model_dir), "--port", str(port), "--host",
                                    "127.0.0.1", "--kv-cache-memory-bytes", str(64 * 256 * 1024), "--log-file",
                                    str(log), "--health-timeout", "240"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        ready = proc.stdout.readline()
        assert ready.startswith(f"ready: http://127.0.0.1:{port}"), (ready, proc.stderr.read() if proc.poll() else "")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as resp:
            models = resp.read().decode()
        assert '"id":"kvbm-tiny"' in models.replace(" ", "") and str(tiny_model_dir) in models  # friendly name first
        assert "Application startup complete" in log.read_text() or "Starting vLLM" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3)
    assert "stopping the engine" in proc.stderr.read()
    # nothing of the engine is left: no process has the engine's port argument any more
    assert [p for p in _engine_pids(port) if p != proc.pid] == []


def test_sigkill_of_kvbm_serve_leaves_no_engine_behind(tiny_model_dir, tmp_path):
    """kill -9 of `kvbm serve` (no cleanup of its own can run): the engine's processes go with it."""
    port = free_port()
    proc = subprocess.Popen(KVBM + ["serve", "--model", str(tiny_model_dir), "--port", str(port), "--host",
                                    "127.0.0.1", "--kv-cache-memory-bytes", str(64 * 256 * 1024), "--log-file",
                                    str(tmp_path / "engine.log"), "--health-timeout", "240"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env())
    try:
        assert proc.stdout.readline().startswith("ready:")
        assert [p for p in _engine_pids(port) if p != proc.pid], "the engine runs"
        proc.kill()
        proc.wait()
        deadline, left = time.monotonic() + 40, ["?"]
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = _engine_pids(port)
        assert left == [], f"engine processes {left} outlived kvbm serve"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_connector_import_error_is_one_line(tiny_model_dir):
    bad = '{"kv_connector":"DynamoConnector","kv_role":"kv_both","kv_connector_module_path":"kvbm_no_such_module"}'
    p = _run(["serve", "--model", str(tiny_model_dir), "--port", str(free_port()), "--log-file", os.devnull, "--",
              "--kv-transfer-config", bad])
    assert p.returncode == 1
    assert "connector import error" in _one_line(p) and "kvbm_no_such_module" in _one_line(p)


def test_kv_cache_smaller_than_max_model_len_is_one_line(tiny_model_dir):
    p = _run(["serve", "--model", str(tiny_model_dir), "--port", str(free_port()), "--kv-cache-memory-bytes",
              str(8 * 256 * 1024), "--max-model-len", "16384", "--log-file", os.devnull])
    assert p.returncode == 1 and "KV cache too small for --max-model-len" in _one_line(p)


def test_unknown_model_is_one_line():
    p = _run(["serve", "--model", "no-such-org/no-such-model-kvbm", "--port", str(free_port()), "--log-file",
              os.devnull])
    assert p.returncode == 1 and "model not found" in _one_line(p)

