"""A user's own `python -m vllm.entrypoints.openai.api_server ... --kv-transfer-config <the README's string>`
gets an engine bound as without a connector: read from vLLM's own "OpenMP thread binding info" log.

vLLM's CPU build reserves one more core per rank for any KV connector; KVBM's vLLM plugin (entry point
`vllm.general_plugins: kvbm`) makes the reservation what it is without one. The negative control starts the same
command with the plugin left out through vLLM's VLLM_PLUGINS and sees the extra core reserved: the check can
fail. That engine is stopped as soon as vLLM has logged its binding (a few seconds), so the module starts one
full engine. Speed is not asserted here (benchmark: `kvbm bench compare scenarios/no-reuse-cpu.yaml`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from vllm_server import free_port, vllm_server

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]

README_CONNECTOR = json.dumps({"kv_connector": "DynamoConnector", "kv_role": "kv_both",
                               "kv_connector_module_path": "kvbm.vllm_integration.connector"})
CPUS = sorted(os.sched_getaffinity(0))


def omp_binding(log: str) -> dict:
    """vLLM's OMPProcessManager log: reserve_cpu_num, the OMP cores of rank 0, the reserved cores."""
    reserve = re.search(r"local_world_size=(\d+), reserve_cpu_num=(\d+)", log)
    cores = re.search(r"local_rank=0, core ids=\[([\d, ]*)\]", log)
    reserved = re.search(r"reserved_cpus=\[([\d, ]*)\]", log)
    assert reserve and cores and reserved, "vLLM logged no OpenMP thread binding info"
    ids = lambda m: [int(x) for x in m.group(1).split(",") if x.strip()]  # noqa: E731
    return {"world": int(reserve.group(1)), "reserve": int(reserve.group(2)), "omp": ids(cores),
            "reserved": ids(reserved)}


def costs_no_core(binding: dict) -> bool:
    """What vLLM does without a connector: one core per rank reserved, the rest (>= 1) for OMP."""
    return (binding["reserve"] == binding["world"] and len(binding["reserved"]) == binding["world"]
            and set(binding["omp"]).isdisjoint(binding["reserved"]) and len(binding["omp"]) >= 1)


def binding_log_until_bound(model_dir: Path, env: dict[str, str], log_path: Path, timeout_s: float = 180) -> str:
    """Start the README's command, return its log once vLLM has bound OMP (then stop the whole group)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host",
           "127.0.0.1", "--port", str(free_port()), "--enforce-eager", "--max-model-len", "4096",
           "--kv-transfer-config", README_CONNECTOR]
    full_env = dict(os.environ) | {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"} | env
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            text = log_path.read_text(errors="replace")
            if "reserved_cpus=" in text:
                return text
            time.sleep(0.5)
        raise AssertionError(f"vLLM logged no OMP binding (exit {proc.poll()}); log {log_path}:\n"
                             + log_path.read_text(errors="replace")[-3000:])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


needs_two_cores = pytest.mark.skipif(len(CPUS) < 2, reason="vLLM reserves nothing on a single core")


@needs_two_cores
def test_readme_command_binds_omp_as_without_a_connector(tiny_model_dir, tmp_path):
    log_path = tmp_path / "engine.log"
    with vllm_server(tiny_model_dir, args=["--kv-transfer-config", README_CONNECTOR, "--seed", "0"],
                     env={"DYN_KVBM_CPU_CACHE_GB": "1", "VLLM_PLUGINS": None, "VLLM_CPU_NUM_OF_RESERVED_CPU": None,
                          "KVBM_THREAD_PLACEMENT": None},
                     max_model_len=4096, log_path=log_path) as url:
        body = json.dumps({"model": str(tiny_model_dir), "prompt": "the cores " * 150, "max_tokens": 16,
                           "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:  # KVBM offloads: its threads run
            assert json.load(resp)["usage"]["completion_tokens"] == 16
        log = log_path.read_text(errors="replace")
    binding = omp_binding(log)
    assert costs_no_core(binding), binding
    assert "KVBM needs none, so OMP threads are bound as without a connector" in log
    placed = re.search(r"kvbm: background threads pinned to cores \[([\d, ]*)\] \(OMP uses \[([\d, ]*)\]\)", log)
    assert placed, "KVBM's transfer threads did not leave the OMP cores"
    pinned = {int(x) for x in placed.group(1).split(",")}
    assert pinned and pinned.isdisjoint(binding["omp"])


@needs_two_cores
def test_negative_control_without_the_plugin_the_connector_costs_a_core(tiny_model_dir, tmp_path):
    log = binding_log_until_bound(tiny_model_dir, {"VLLM_PLUGINS": "lora_filesystem_resolver",
                                                   "DYN_KVBM_CPU_CACHE_GB": "1"}, tmp_path / "engine.log")
    binding = omp_binding(log)
    assert binding["reserve"] == binding["world"] + 1  # vLLM's "one more core for nixl_connector"
    assert not costs_no_core(binding), binding
    assert "KVBM needs none" not in log
