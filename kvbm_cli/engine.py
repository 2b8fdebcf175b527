"""Engine launch: vLLM's OpenAI server with or without the KVBM connector; every vLLM command-line fact is here.

Operations:
  EngineSpec                     what to launch (model, connector, G1 size, KVBM tiers, extra vLLM args)
  build_launch(spec, environ)    the exact argv and environment changes (what --dry-run prints)
  Engine(launch)                 start / wait_healthy / stop (whole process group) / failure explained in one line
  explain_failure(log, rc)       a known engine failure (port in use, out of memory, model not found, ...) in one line
  start_and_wait(engine, ...)    start and wait for /health with a spinner on a terminal
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import KW_ONLY, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Literal, Optional

from pydantic import Field

from kvbm.config import BYTES_PER_GB
from kvbm.mechanism.remote import redacted
from kvbm_cli import _reaper, httpclient, tiny_model
from kvbm_cli._errors import CheckFailed, CliError
from kvbm_cli._keys import Keys
from kvbm_cli._output import progress

KVBM_CONNECTOR_MODULE = "kvbm.vllm_integration.connector"
KV_TRANSFER_CONFIG = json.dumps({"kv_connector": "DynamoConnector", "kv_role": "kv_both",
                                 "kv_connector_module_path": KVBM_CONNECTOR_MODULE}, separators=(",", ":"))
DEFAULT_MAX_MODEL_LEN = 16384  # for the embedded default model
TINY_SERVED_NAME = "kvbm-tiny"  # what requests name the embedded model (its path is accepted too)
TINY_KV_BYTES_PER_TOKEN = tiny_model.NUM_LAYERS * 2 * tiny_model.NUM_KV_HEADS * tiny_model.HEAD_DIM * 2  # bf16 K and V
KVBM_ENV = ("DYN_KVBM_CPU_CACHE_GB", "DYN_KVBM_DISK_CACHE_GB", "DYN_KVBM_DISK_CACHE_DIR", "DYN_KVBM_REMOTE_URL")


def shown(key: str, value: str) -> str:
    """An environment value as printed or recorded: the shared store's password and secret never appear."""
    if key == "DYN_KVBM_REMOTE_URL":
        return redacted(value)
    return "***" if key == "DYN_KVBM_REMOTE_SECRET" and value else value


class EngineSpec(Keys):
    """One engine configuration; field names follow the `kvbm serve` options (and scenario YAML keys)."""

    model: Optional[str] = None
    connector: Literal["kvbm", "none"] = "none"
    port: int = 8000
    host: Optional[str] = None
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1)
    kv_cache_memory_bytes: Optional[int] = Field(None, gt=0)  # G1, or gpu_cache_gb
    gpu_cache_gb: Optional[float] = Field(None, gt=0)
    block_size: Optional[int] = Field(None, gt=0)
    enable_prefix_caching: Optional[bool] = True
    max_model_len: Optional[int] = None
    cpu_cache_gb: Optional[float] = Field(None, ge=0)
    disk_cache_gb: Optional[float] = Field(None, ge=0)
    disk_cache_dir: Optional[str] = None
    remote_url: Optional[str] = None
    vllm_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)


@dataclass
class Launch:
    """The exact process to start: argv, environment changes, notes for the user."""

    argv: list[str]
    env_set: dict[str, str]
    env_unset: list[str]
    notes: list[str]
    model: str  # what a request names: the served name (kvbm-tiny for the embedded model), else the model
    url: str
    spec: EngineSpec

    def environ(self, base: Optional[dict[str, str]] = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        for key in self.env_unset:
            env.pop(key, None)
        env.update(self.env_set)
        return env

    def shell(self) -> str:
        """One copy-pasteable shell line (secrets masked)."""
        unset = ["env", *(f"-u {k}" for k in self.env_unset)] if self.env_unset else []
        assigns = [f"{k}={shlex.quote(shown(k, v))}" for k, v in self.env_set.items()]
        return " ".join(unset + assigns + [shlex.join(self.argv)])

    def engine_info(self, environ: Optional[dict[str, str]] = None) -> dict:
        """What summary.json records under "engine"."""
        env = self.environ(environ)
        return {"connector": self.spec.connector, "url": self.url,
                "env": {k: shown(k, v) for k, v in sorted(env.items()) if k.startswith(("DYN_KVBM_", "VLLM_CPU_"))
                        or k in ("VLLM_PLUGINS", "KVBM_THREAD_PLACEMENT")},
                "vllm_args": self.argv[3:]}


def build_launch(spec: EngineSpec, environ: Optional[dict[str, str]] = None, *, cpu: Optional[bool] = None) -> Launch:
    """The argv and environment for `spec`; raises CliError for contradictory or impossible settings."""
    environ = dict(os.environ if environ is None else environ) | spec.env
    cpu = any(metadata.distributions(name="vllm-cpu")) if cpu is None else cpu  # vLLM's CPU build
    notes: list[str] = []
    if spec.model is None:
        model = str(tiny_model.default_model_dir())
        notes.append(f"model: the embedded tiny default ({model}), seeded random weights")
    elif spec.model.startswith(("/", "./", "../", "~")) or Path(spec.model).exists():  # a path, not a model id
        path = Path(spec.model).expanduser()
        if not (path / "config.json").is_file():
            raise CliError(f"model not found: {spec.model} is not a model directory (no config.json there)")
        model = str(path)
    else:
        model = spec.model
    tiny = (Path(model) / tiny_model.MARKER).is_file()
    if spec.kv_cache_memory_bytes is not None and spec.gpu_cache_gb is not None:
        raise CliError("give --kv-cache-memory-bytes or --gpu-cache-gb, not both (both size vLLM's own KV cache)")
    kv_bytes = spec.kv_cache_memory_bytes if spec.gpu_cache_gb is None else int(spec.gpu_cache_gb * BYTES_PER_GB)
    if cpu and spec.gpu_memory_utilization is not None:
        notes.append("--gpu-memory-utilization has no effect on vLLM's CPU build: size G1 with "
                     "--kv-cache-memory-bytes or --gpu-cache-gb")
    if cpu and spec.block_size is not None and spec.block_size % 32:
        raise CliError(f"--block-size {spec.block_size}: vLLM's CPU build needs a positive multiple of 32")
    max_len = spec.max_model_len
    if max_len is None and tiny:
        max_len = DEFAULT_MAX_MODEL_LEN
        if kv_bytes is not None:  # vLLM refuses a max length its KV cache cannot hold
            block = spec.block_size or 128
            capacity = (kv_bytes // (TINY_KV_BYTES_PER_TOKEN * block) - 1) * block
            if capacity < block:
                raise CliError(f"G1 of {kv_bytes} bytes holds no full {block}-token block of the tiny model "
                               f"({TINY_KV_BYTES_PER_TOKEN * block} bytes each)")
            max_len = min(max_len, capacity)

    values = {"--host": spec.host or None, "--port": spec.port, "--gpu-memory-utilization": spec.gpu_memory_utilization,
              "--kv-cache-memory-bytes": kv_bytes, "--block-size": spec.block_size, "--max-model-len": max_len}
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    argv += [arg for flag, value in values.items() if value is not None for arg in (flag, str(value))]
    if tiny:  # its seeded random weights load in a second; older copies without them use vLLM's dummy loader
        if not (Path(model) / "model.safetensors").is_file():
            argv += ["--load-format", "dummy"]
        argv += ["--enforce-eager"]
    if spec.enable_prefix_caching is not None:
        argv += ["--enable-prefix-caching" if spec.enable_prefix_caching else "--no-enable-prefix-caching"]
    if spec.connector == "kvbm":
        argv += ["--kv-transfer-config", KV_TRANSFER_CONFIG]
    served = model
    if tiny and not any(a.split("=")[0] == "--served-model-name" for a in spec.vllm_args):
        served = TINY_SERVED_NAME
        argv += ["--served-model-name", served, model]  # a friendly name first; the path still works
    argv += list(spec.vllm_args)

    env_set: dict[str, str] = dict(spec.env)
    env_unset: list[str] = []
    if "HF_HUB_OFFLINE" not in environ and (tiny or spec.model is None):
        env_set["HF_HUB_OFFLINE"] = "1"
    for var, value in zip(KVBM_ENV, (spec.cpu_cache_gb, spec.disk_cache_gb, spec.disk_cache_dir, spec.remote_url)):
        if value is not None:
            env_set[var] = f"{value:g}" if isinstance(value, float) else str(value)
    if spec.connector == "none" and any(environ.get(v) for v in KVBM_ENV):
        notes.append("--connector none: the DYN_KVBM_* settings have no effect")
    if spec.connector == "kvbm" and not (env_set.get("DYN_KVBM_CPU_CACHE_GB") or environ.get("DYN_KVBM_CPU_CACHE_GB")
                                         or environ.get("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS")):
        notes.append("--connector kvbm without a CPU tier (--cpu-cache-gb / DYN_KVBM_CPU_CACHE_GB): "
                     "KVBM has nowhere to offload to")
    explicit_size = kv_bytes is not None or any(a.split("=")[0] in ("--kv-cache-memory-bytes", "--num-gpu-blocks-override")
                                                for a in spec.vllm_args)
    if cpu:
        if explicit_size and environ.get("VLLM_CPU_KVCACHE_SPACE"):
            env_unset.append("VLLM_CPU_KVCACHE_SPACE")
            notes.append("VLLM_CPU_KVCACHE_SPACE unset for the engine: it would override the explicit G1 size")
        elif not explicit_size and not environ.get("VLLM_CPU_KVCACHE_SPACE"):
            env_set["VLLM_CPU_KVCACHE_SPACE"] = "1"
            notes.append("G1 = 1 GiB (VLLM_CPU_KVCACHE_SPACE=1): vLLM's CPU build needs an explicit KV size")
    if cpu and spec.connector == "kvbm":
        _keep_cpu_reservation(environ, env_set, notes, spec.vllm_args)
    host = spec.host if spec.host not in (None, "0.0.0.0", "::") else "127.0.0.1"
    return Launch(argv, env_set, env_unset, notes, served, f"http://{host}:{spec.port}", spec)


def _keep_cpu_reservation(environ: dict[str, str], env_set: dict[str, str], notes: list[str],
                          vllm_args: list[str]) -> None:
    """A KVBM connector must not cost vLLM's CPU build a core: KVBM's vLLM plugin sees to it in the engine; where
    the plugin will not run (not registered, left out of VLLM_PLUGINS), set VLLM_CPU_NUM_OF_RESERVED_CPU here."""
    from kvbm.integrations.vllm import plugin

    if environ.get(plugin.RESERVED_CPU_VAR) or environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") not in ("", "auto"):
        return
    allowed = environ.get("VLLM_PLUGINS")
    if plugin.plugin_registered() and (allowed is None or plugin.PLUGIN_NAME in [p.strip() for p in allowed.split(",")]):
        return
    ranks = 1  # per engine: tensor x pipeline parallel, from vLLM's own flags
    for i, arg in enumerate(vllm_args):
        name, _, value = arg.partition("=")
        if name in ("-tp", "--tensor-parallel-size", "-pp", "--pipeline-parallel-size"):
            value = value or (vllm_args[i + 1] if i + 1 < len(vllm_args) else "1")
            ranks *= int(value) if value.isdigit() else 1
    env_set[plugin.RESERVED_CPU_VAR] = str(ranks)
    notes.append(f"{plugin.RESERVED_CPU_VAR}={ranks}: KVBM's vLLM plugin will not run in this engine, so kvbm sets "
                 "the core reservation vLLM makes without a connector (KVBM needs no core of its own)")


_FAILURES: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
    (re.compile(r"kvbm\.errors\.(?:ConfigError|StorageError): ([^\n]+)"),
     lambda m: f"KVBM configuration: {m.group(1).strip()}"),
    (re.compile(r"address already in use|\[Errno 98\]", re.IGNORECASE),
     lambda m: "port in use: another process listens on the engine's port; choose another with --port"),
    (re.compile(r"(?:ModuleNotFoundError|ImportError): (?:No module named )?'?([\w.]*(?:kvbm|connector)[\w.]*)'?"),
     lambda m: f"connector import error: vLLM could not import {m.group(1)!r}; is kvbm installed in the "
               "engine's Python (pip install -e .)?"),
    (re.compile(r"Class (\w+) not found in ([\w.]+)"),
     lambda m: f"connector import error: class {m.group(1)} not found in module {m.group(2)}"),
    (re.compile(r"(To serve at least one request with the \w+'?s? max seq len \(\d+\).*?KV cache is needed, "
                r"which is larger than the available KV cache memory[^.]*)"),
     lambda m: f"KV cache too small for --max-model-len: {m.group(1).strip()}; lower --max-model-len or give "
               "G1 more memory"),
    (re.compile(r"(Available memory on node.*?is less than desired CPU memory utilization[^\n]*)"),
     lambda m: f"out of memory: {m.group(1).strip()}; set a smaller G1 (--kv-cache-memory-bytes)"),
    (re.compile(r"(CUDA out of memory|OutOfMemoryError|torch\.OutOfMemoryError|out of memory|"
                r"Cannot allocate memory|No available memory for the cache blocks)", re.IGNORECASE),
     lambda m: f"out of memory ({m.group(1)}): lower the G1 size, --max-model-len or --cpu-cache-gb"),
    (re.compile(r"(is not a local folder and is not a valid model identifier|Repository Not Found|LocalEntryNotFoundError|"
                r"RepositoryNotFoundError|Cannot find an appropriate cached snapshot|"
                r"does not appear to have a file named config\.json|OfflineModeIsEnabled|"
                r"Cannot find the requested files in the local cache|We couldn't connect to|"
                r"Invalid repository ID or local directory specified)"),
     lambda m: f"model not found: {m.group(1)} (give a local model directory, or a model id in the Hugging Face "
               "cache; HF_HUB_OFFLINE=1 forbids downloads)"),
]


def explain_failure(log_text: str, returncode: Optional[int]) -> str:
    """One line explaining why the engine stopped, from its log and exit status."""
    for pattern, message in _FAILURES:
        m = pattern.search(log_text)
        if m:
            return message(m)
    if returncode in (-9, 137):
        return "the engine was killed (SIGKILL: out of memory?); see its log"
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"\b\w*(Error|Exception)\b", ln)]
    last = (errors or lines or ["no output"])[-1]
    return f"the engine exited with status {returncode}: {last[-300:]}"


def port_busy(host: Optional[str], port: int) -> Optional[str]:
    """None when (host, port) can be bound now, else why not (kvbm serve refuses it, kvbm doctor reports it)."""
    host = host or "0.0.0.0"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kvbm_metrics_on(spec: EngineSpec, port: int = 0) -> str:
    """Set `spec` to serve KVBM's own metrics on `port` (a free one by default); return their URL."""
    spec.env = spec.env | {"DYN_KVBM_METRICS": "true", "DYN_KVBM_METRICS_PORT": str(port := port or free_port())}
    return f"http://127.0.0.1:{port}"


class EngineFailed(CheckFailed):
    """The engine stopped or never became healthy (one line, exit 1)."""


@dataclass(eq=False)
class Engine:
    """A vLLM server process group: start, wait for /health, stop. The log goes to a file and/or a callback."""

    launch: Launch
    _: KW_ONLY
    log_path: Optional[Path] = None
    on_line: Optional[Callable[[str], None]] = None
    die_with_parent: bool = True
    proc: Optional[subprocess.Popen] = field(default=None, init=False)
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=400), init=False)
    _reader: Optional[threading.Thread] = field(default=None, init=False)

    def start(self) -> None:
        spec = self.launch.spec
        if port_busy(spec.host, spec.port):
            raise CliError(f"port in use: {spec.port} already has a listener; choose another with --port")
        # The engine's group dies with this process, even by SIGKILL: kvbm_cli._reaper heads the group and gets
        # the parent-death signal (PR_SET_PDEATHSIG); it stops the whole group, vLLM's engine core included.
        preexec = _reaper.die_with_parent(signal.SIGTERM, os.getpid()) if self.die_with_parent else None
        self.proc = subprocess.Popen([sys.executable, "-m", "kvbm_cli._reaper", *self.launch.argv],
                                     env=self.launch.environ(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        log = open(self.log_path, "a", encoding="utf-8", errors="replace", buffering=1) if self.log_path else None
        with log or contextlib.nullcontext():
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                self.tail.append(line)
                if log:  # line-buffered: a reader of the log sees each line at once
                    log.write(line + "\n")
                if self.on_line:
                    self.on_line(line)

    def failure(self) -> str:
        """Why the engine stopped, in one line (explain_failure of its log's tail)."""
        if self._reader:
            self._reader.join(timeout=5)
        return explain_failure("\n".join(self.tail), self.proc.returncode if self.proc else None)

    def wait_healthy(self, timeout_s: float, tick: Callable[[float], None] = lambda elapsed: None) -> float:
        """Block until /health answers; returns the seconds it took. Raises EngineFailed on exit or timeout."""
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise EngineFailed(self.failure())
            if httpclient.healthy(self.launch.url):
                return time.monotonic() - start
            elapsed = time.monotonic() - start
            if elapsed > timeout_s:
                self.stop()
                where = f"; log: {self.log_path}" if self.log_path else ""
                raise EngineFailed(f"the engine was not healthy after {timeout_s:.0f} s (--health-timeout){where}")
            tick(elapsed)
            time.sleep(0.5)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `grace_s`."""
        if not self.proc:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):  # SIGKILL: what outlives the server
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait_s)
        if self._reader:
            self._reader.join(timeout=5)


@contextlib.contextmanager
def sigterm_as_exception():
    """SIGTERM raises KeyboardInterrupt in the main thread, so `finally` blocks stop the engine (exit 130)."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_and_wait(engine: Engine, timeout_s: float, label: str) -> float:
    """Start `engine` and wait for health with a spinner on a terminal; returns the start-up seconds."""
    with progress("spinner") as bar:
        task = bar.add_task(f"starting {label} (timeout {timeout_s:.0f} s)", total=None)
        if engine.on_line is not None:
            engine.on_line = lambda line: bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        engine.start()
        return engine.wait_healthy(timeout_s, tick=lambda e: bar.update(task))
