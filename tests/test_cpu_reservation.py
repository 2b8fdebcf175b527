"""Fast tests of what keeps a KVBM connector from costing vLLM's CPU build a core: the vLLM plugin's decision,
`kvbm doctor`'s row, `kvbm serve`'s fallback, the background-thread placement and the scenario sweep.

The engine-level evidence (vLLM's own OMP binding log, with and without the plugin) is in
test_cpu_reservation_engine.py.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import kvbm_cli.app  # noqa: F401  (assembles the CLI first: command modules import each other through it)
from kvbm.integrations.vllm import plugin
from kvbm.mechanism import threads

KVBM = {"kv_connector": "DynamoConnector", "kv_role": "kv_both",
        "kv_connector_module_path": "kvbm.vllm_integration.connector"}
NATIVE = {"kv_connector": "KvbmConnector", "kv_role": "kv_both",
          "kv_connector_module_path": "kvbm.integrations.vllm.connector"}
NIXL = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}


class _Cfg:  # attribute access, like vLLM's KVTransferConfig
    def __init__(self, d):
        self.__dict__.update(d)


@pytest.mark.parametrize("cfg", [KVBM, NATIVE, _Cfg(KVBM)])
def test_kvbm_connector_on_cpu_is_bound_as_without_a_connector(cfg):
    d = plugin.decide(cfg, {}, is_cpu=True, local_world_size=1)
    assert d.apply
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" in d.message and "KVBM needs none" in d.message


@pytest.mark.parametrize("cfg", [None, NIXL, {"kv_connector": "DynamoConnector"}, _Cfg(NIXL)])
def test_other_connectors_or_none_are_left_to_vllm(cfg):
    assert plugin.decide(cfg, {}, is_cpu=True, local_world_size=1) == plugin.Decision(False, None)


def test_gpu_platforms_are_left_alone():
    assert plugin.decide(KVBM, {}, is_cpu=False, local_world_size=2) == plugin.Decision(False, None)


def test_a_value_the_user_set_is_never_overridden():
    d = plugin.decide(KVBM, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "2"}, is_cpu=True, local_world_size=1)
    assert not d.apply and "set by the user" in d.message


def test_the_config_seen_by_vllm_loses_only_the_connector():
    class Config:
        kv_transfer_config = _Cfg(KVBM)
        parallel_config = object()

    seen = plugin._WithoutConnector(Config())
    assert seen.kv_transfer_config is None and seen.parallel_config is Config.parallel_config


def test_fix_line_names_the_variable_and_value():
    assert plugin.reservation_fix(2).startswith("set VLLM_CPU_NUM_OF_RESERVED_CPU=2 ")


def test_the_entry_point_is_registered():
    assert plugin.plugin_registered(), "run pip install -e . --no-deps (pyproject's vllm.general_plugins entry point)"


@pytest.mark.parametrize("env,registered,status,word", [
    ({}, True, "ok", "installed"),
    ({}, False, "warn", "pip install -e ."),
    ({"VLLM_PLUGINS": "lora_filesystem_resolver"}, True, "warn", "add kvbm to VLLM_PLUGINS"),
    ({"VLLM_PLUGINS": "kvbm,lora_filesystem_resolver"}, True, "ok", "installed"),
    ({"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, False, "ok", "set by you"),
    ({"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, True, "warn", "fewer cores"),
    ({"VLLM_CPU_NUM_OF_RESERVED_CPU": "x"}, True, "fail", "not a number"),
    ({"VLLM_CPU_OMP_THREADS_BIND": "0-3"}, False, "ok", "by hand"),
])
def test_doctor_row(env, registered, status, word):
    got, detail, fix = plugin.doctor_check(env, cpu_build=True, registered=registered, num_cpus=2)
    assert got == status and word in detail + fix
    if status != "ok":
        assert fix


def test_doctor_row_off_the_cpu_build_is_information():
    assert plugin.doctor_check({}, cpu_build=False, registered=False)[0] == "info"


# --- kvbm serve -------------------------------------------------------------------------------------------

def test_serve_relies_on_the_plugin_when_it_runs(tiny_model_dir):
    from kvbm_cli.engine import EngineSpec, build_launch

    launch = build_launch(EngineSpec(model=str(tiny_model_dir), connector="kvbm"), {}, cpu=True)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in launch.env_set


@pytest.mark.parametrize("args,ranks", [([], "1"), (["-tp", "2"], "2"), (["--tensor-parallel-size=2", "-pp", "2"], "4")])
def test_serve_sets_the_reservation_where_the_plugin_is_left_out(tiny_model_dir, args, ranks):
    from kvbm_cli.engine import EngineSpec, build_launch

    spec = EngineSpec(model=str(tiny_model_dir), connector="kvbm", vllm_args=args)
    launch = build_launch(spec, {"VLLM_PLUGINS": "lora_filesystem_resolver"}, cpu=True)
    assert launch.env_set["VLLM_CPU_NUM_OF_RESERVED_CPU"] == ranks
    assert any("plugin will not run" in n for n in launch.notes)
    mine = build_launch(spec, {"VLLM_PLUGINS": "none", "VLLM_CPU_NUM_OF_RESERVED_CPU": "3"}, cpu=True)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in mine.env_set  # the user's own value stays
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in build_launch(
        EngineSpec(model=str(tiny_model_dir), connector="none"), {"VLLM_PLUGINS": "none"}, cpu=True).env_set


# --- background threads ---------------------------------------------------------------------------------

@pytest.mark.parametrize("env,cpus", [
    ({"OMP_PLACES": "{0}"}, {0}), ({"OMP_PLACES": "{0,1,2}"}, {0, 1, 2}), ({"GOMP_CPU_AFFINITY": "0 2 4"}, {0, 2, 4}),
    ({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[1,3]"}, {1, 3}), ({"OMP_PLACES": "cores"}, None), ({}, None),
])
def test_omp_cores_are_read_from_what_vllm_set(env, cpus):
    assert threads.omp_cpus(env) == cpus


def _run_in_thread(fn):
    box = {}

    def target():
        fn()
        box["affinity"] = os.sched_getaffinity(0)
        box["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        box["policy"] = os.sched_getscheduler(0)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    return box


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_background_threads_leave_the_omp_cores_and_keep_their_priority(monkeypatch):
    # a niced thread holding the worker's GIL on the busy reserved core makes the engine thread wait (issue 11)
    allowed = sorted(threads.allowed_cpus())
    monkeypatch.setenv("OMP_PLACES", "{%d}" % allowed[0])
    monkeypatch.setenv("KVBM_THREAD_PLACEMENT", "auto")
    got = _run_in_thread(threads.place_background_thread)
    assert allowed[0] not in got["affinity"] and got["affinity"]
    assert got["nice"] == os.getpriority(os.PRIO_PROCESS, 0)
    assert os.sched_getaffinity(0) == set(allowed) or allowed[0] in os.sched_getaffinity(0)  # caller untouched


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
@pytest.mark.parametrize("mode", ["auto", "idle"])
def test_an_awaited_thread_leaves_the_omp_cores_but_keeps_its_priority(monkeypatch, mode):
    # onboarding: a request waits for it, so it must not starve behind busy processes on the reserved core
    allowed = sorted(threads.allowed_cpus())
    monkeypatch.setenv("OMP_PLACES", "{%d}" % allowed[0])
    monkeypatch.setenv("KVBM_THREAD_PLACEMENT", mode)
    got = _run_in_thread(lambda: threads.place_background_thread(awaited=True))
    assert got["nice"] == os.getpriority(os.PRIO_PROCESS, 0) and got["policy"] == os.sched_getscheduler(0)
    if mode == "auto":
        assert allowed[0] not in got["affinity"] and got["affinity"]


def test_placement_modes(monkeypatch):
    monkeypatch.setenv("OMP_PLACES", "{0}")
    monkeypatch.setenv("KVBM_THREAD_PLACEMENT", "off")
    off = _run_in_thread(threads.place_background_thread)
    assert off["affinity"] == os.sched_getaffinity(0) and off["nice"] == os.getpriority(os.PRIO_PROCESS, 0)
    monkeypatch.setenv("KVBM_THREAD_PLACEMENT", "idle")
    assert _run_in_thread(threads.place_background_thread)["policy"] == os.SCHED_IDLE


def test_a_pool_started_by_a_placed_thread_inherits_the_placement(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("OMP_PLACES", "{0}")
    monkeypatch.setenv("KVBM_THREAD_PLACEMENT", "nice")
    pool = ThreadPoolExecutor(max_workers=1, initializer=threads.place_background_thread)
    try:
        nice = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    finally:
        pool.shutdown()
    assert nice >= threads.NICE


# --- the no-reuse scenario --------------------------------------------------------------------------------

def test_no_reuse_scenario_sweeps_concurrency_with_fresh_prompts():
    from kvbm_cli.bench.compare import load_scenario, sweep_points

    path = Path(__file__).resolve().parents[1] / "scenarios" / "no-reuse-cpu.yaml"
    points = sweep_points(load_scenario(path))
    assert [(label, wl.concurrency) for label, wl in points] == [("concurrency-1", 1), ("concurrency-8", 8)]
    assert len({wl.random_seed for _, wl in points}) == 2  # a later point never reuses an earlier one's KV
    assert all(wl.prefix_prompt_length == 0 and wl.synthetic_input_tokens_mean == 256
               and wl.output_tokens_mean == 200 for _, wl in points)


def test_a_sweep_takes_one_key(tmp_path):
    from kvbm_cli._errors import CliError
    from kvbm_cli.bench.compare import load_scenario

    bad = tmp_path / "s.yaml"
    bad.write_text("name: s\nworkload: {type: prefix-reuse}\nsweep: {concurrency: [1], request-count: [2]}\n"
                   "configs: [{name: a, connector: none}, {name: b, connector: kvbm}]\n")
    with pytest.raises(CliError, match="one workload key"):
        load_scenario(bad)


def test_startup_note_names_the_fix_only_when_the_plugin_did_not_run(monkeypatch):
    class Config:
        class parallel_config:
            local_world_size = 1

    monkeypatch.setattr(plugin, "applied", False)
    note = plugin.startup_note(Config(), {})
    assert note and "VLLM_CPU_NUM_OF_RESERVED_CPU=1" in note and "VLLM_PLUGINS" in note
    assert plugin.startup_note(Config(), {"VLLM_CPU_NUM_OF_RESERVED_CPU": "2"}) is None
    monkeypatch.setattr(plugin, "applied", True)
    assert plugin.startup_note(Config(), {}) is None
