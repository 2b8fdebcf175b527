"""KVBM's vLLM general plugin: a KV connector costs no CPU core on vLLM's CPU build.

vLLM's CPU build reserves one more core per rank for a "connector" process whenever any
`--kv-transfer-config` is given (vllm/utils/ompmultiprocessing.py, "reserve at one more core for
nixl_connector"), and binds each worker's OMP compute threads to the cores left. KVBM runs no such process:
its transfers are threads of the worker that KVBM keeps off the OMP cores itself (kvbm.mechanism.threads). On
a machine with few cores the extra reservation changes the engine: on 2 cores it takes both, so OMP runs 2
threads on every core, spinning against the scheduler and the API server, and decode runs 2-3x slower with the
connector doing nothing (and with other numerics than plain vLLM's 1-thread OMP).

vLLM loads `vllm.general_plugins` entry points in every process (API server, EngineCore, workers); EngineCore
loads them before it builds its executor, and the executor computes the reservation (OMPProcessManager, in
EngineCore) before it starts the workers. `register()` wraps that computation so that, when a KVBM connector is
configured on the CPU platform and the user has not set VLLM_CPU_NUM_OF_RESERVED_CPU, the reservation and
OMP binding are what vLLM gives the same engine without a connector. It logs one line saying so; where it
cannot (a vLLM without OMPProcessManager), it logs one line naming the fix instead.

Entry point (pyproject.toml): `[project.entry-points."vllm.general_plugins"] kvbm = ...:register`.
Turn it off with vLLM's own VLLM_PLUGINS (a comma list of the plugins to load, e.g. VLLM_PLUGINS=none).

Operations:
  register()                                  the entry point (every vLLM process; idempotent)
  is_kvbm_connector(kv_transfer_config)       a KVBM connector (Dynamo's module path or the native one)?
  decide(kv_transfer_config, environ, is_cpu, local_world_size)   what to do, and the line to log
  reservation_fix()                           the line that names the manual fix (doctor, the connector)
  plugin_registered() / doctor_check(...)     `kvbm doctor`'s "vLLM CPU cores" row
  startup_note(vllm_config)                   for the connector (EngineCore): the fix in one line, if it is needed
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from kvbm.integrations.vllm.compat import setup_logging

log = logging.getLogger("kvbm.plugin")

RESERVED_CPU_VAR = "VLLM_CPU_NUM_OF_RESERVED_CPU"
PLUGIN_NAME = "kvbm"
KVBM_MODULES = ("kvbm.vllm_integration.connector", "kvbm.integrations.vllm.connector")
_installed = False
applied = False  # set in EngineCore when the reservation was computed as without a connector


def is_kvbm_connector(kv_transfer_config: Any) -> bool:
    """True when vLLM's kv_transfer_config (object or dict) loads a KVBM connector."""
    if kv_transfer_config is None:
        return False
    get = kv_transfer_config.get if isinstance(kv_transfer_config, Mapping) else (
        lambda key: getattr(kv_transfer_config, key, None))
    module = get("kv_connector_module_path") or ""
    return module in KVBM_MODULES or module.startswith("kvbm.")


def reservation_fix(local_world_size: int = 1) -> str:
    """The manual fix, in one line."""
    return (f"set {RESERVED_CPU_VAR}={local_world_size} (what vLLM reserves without a connector: one core per rank) "
            f"so the KV connector costs no compute core")


@dataclass(frozen=True)
class Decision:
    """Whether to compute vLLM's CPU reservation as without a connector, and the line to log (or None)."""

    apply: bool
    message: Optional[str]


def decide(kv_transfer_config: Any, environ: Mapping[str, str], *, is_cpu: bool, local_world_size: int) -> Decision:
    """Pure decision logic of the plugin (unit-tested)."""
    if not is_cpu or not is_kvbm_connector(kv_transfer_config):
        return Decision(False, None)
    if environ.get(RESERVED_CPU_VAR) not in (None, ""):
        return Decision(False, f"kvbm: {RESERVED_CPU_VAR}={environ[RESERVED_CPU_VAR]} set by the user: vLLM's CPU "
                               "core reservation left as given")
    return Decision(True, f"kvbm: vLLM's CPU build reserves {local_world_size} more core(s) for any KV connector; "
                          "KVBM needs none, so OMP threads are bound as without a connector "
                          f"({RESERVED_CPU_VAR} overrides)")


class _WithoutConnector:
    """A VllmConfig seen without its kv_transfer_config (everything else passes through)."""

    kv_transfer_config = None

    def __init__(self, config: Any):
        self._config = config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def _install() -> None:
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.utils.ompmultiprocessing import OMPProcessManager
    except ImportError as exc:  # a vLLM without this machinery: say what to do instead
        setup_logging()
        log.warning("kvbm: cannot adjust vLLM's CPU core reservation (%s); %s", exc, reservation_fix())
        return
    original = OMPProcessManager.__init__
    if getattr(original, "_kvbm_wrapped", False):
        return

    def __init__(self, config, *args, **kwargs):
        global applied
        try:
            world = int(config.parallel_config.local_world_size)
            decision = decide(config.kv_transfer_config, os.environ, is_cpu=True, local_world_size=world)
        except Exception as exc:  # noqa: BLE001 - never stop vLLM over an optimisation
            setup_logging()
            log.warning("kvbm: cannot read vLLM's config to adjust its CPU core reservation (%s); %s",
                        exc, reservation_fix())
            decision = Decision(False, None)
        if decision.message:
            setup_logging()
            log.info(decision.message)
        if decision.apply:
            applied = True
            config = _WithoutConnector(config)
        original(self, config, *args, **kwargs)

    __init__._kvbm_wrapped = True  # type: ignore[attr-defined]
    OMPProcessManager.__init__ = __init__


def register() -> None:
    """vLLM general plugin entry point: loaded in every vLLM process, possibly more than once."""
    global _installed
    if _installed:
        return
    _installed = True
    _install()


def plugin_registered() -> bool:
    """True when this Python has KVBM's `vllm.general_plugins` entry point (pip install -e . registers it)."""
    from importlib.metadata import entry_points

    return any(ep.name == PLUGIN_NAME for ep in entry_points(group="vllm.general_plugins"))


def doctor_check(environ: Mapping[str, str], *, cpu_build: bool, registered: bool, workers: int = 1,
                 num_cpus: Optional[int] = None) -> tuple[str, str, str]:
    """(status, detail, fix) of `kvbm doctor`'s "vLLM CPU cores" row: will a KVBM connector cost a core?"""
    if num_cpus is None:
        num_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not cpu_build:
        return "info", "not vLLM's CPU build: no core is reserved for a KV connector", ""
    bind = environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if bind not in ("", "auto"):
        return "ok", f"VLLM_CPU_OMP_THREADS_BIND={bind!r}: OMP cores chosen by hand, no reservation applies", ""
    fix = reservation_fix(workers)
    user = environ.get(RESERVED_CPU_VAR)
    if user not in (None, ""):
        try:
            value = int(user)
        except ValueError:
            return "fail", f"{RESERVED_CPU_VAR}={user!r} is not a number", fix
        if value < workers:
            return "warn", (f"{RESERVED_CPU_VAR}={value}: fewer cores than ranks ({workers}) left to vLLM's scheduler "
                            "and API server; OMP threads compete with them"), fix
        return "ok", f"{RESERVED_CPU_VAR}={value} (set by you): {max(num_cpus - value, 0)} of {num_cpus} cores for OMP", ""
    plugins = environ.get("VLLM_PLUGINS")
    if not registered:
        return "warn", ("KVBM's vLLM plugin is not installed: with a KVBM connector vLLM's CPU build reserves one "
                        f"more core per rank ({num_cpus} cores here)"), f"pip install -e . (registers it), or {fix}"
    if plugins is not None and PLUGIN_NAME not in [p.strip() for p in plugins.split(",")]:
        return "warn", (f"VLLM_PLUGINS={plugins!r} leaves out KVBM's plugin: with a KVBM connector vLLM's CPU build "
                        "reserves one more core per rank"), f"add {PLUGIN_NAME} to VLLM_PLUGINS, or {fix}"
    return "ok", ("KVBM's vLLM plugin is installed: with a KVBM connector OMP is bound as without one "
                  f"({max(num_cpus - workers, 1)} of {num_cpus} cores for OMP)"), ""


def startup_note(vllm_config: Any, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """For the scheduler-side connector (EngineCore, after vLLM bound OMP): the one line naming the fix when a
    KVBM connector cost this CPU engine a core because the plugin did not run here; None when all is well."""
    env = os.environ if environ is None else environ
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return None
        world = int(vllm_config.parallel_config.local_world_size)
    except Exception:  # noqa: BLE001
        return None
    if (applied or env.get(RESERVED_CPU_VAR) not in (None, "")
            or env.get("VLLM_CPU_OMP_THREADS_BIND", "auto") not in ("", "auto")):
        return None
    return (f"kvbm: vLLM's CPU build reserved {world} more core(s) for this KV connector (KVBM's vLLM plugin did not "
            f"run: pip install -e . registers it, VLLM_PLUGINS must include {PLUGIN_NAME}); {reservation_fix(world)}")
