"""KVBM configuration from the DYN_KVBM_* environment variables users of Dynamo's KVBM already set.

Operations:
  KvbmConfig.from_env(env)    parse and validate every variable; one ConfigError naming variable, value, fix
  KvbmConfig.host_num_blocks  G2 slots for a given block size in bytes (GB is 10^9 bytes, as in Dynamo)
  KvbmConfig.disk_num_blocks  G3 slots likewise
  KvbmConfig.explain()        each variable, its raw value, what kvbm made of it (for `kvbm doctor`)
  check_disk_dir(path)        the directory exists or can be created and a file can be written in it
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from pydantic import BaseModel, ConfigDict, SecretStr

from kvbm.errors import ConfigError

BYTES_PER_GB = 1_000_000_000  # Dynamo's KVBM counts DYN_KVBM_*_GB in 10^9 bytes.

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class EnvVar:
    """One DYN_KVBM_* variable: its name, default (as a user would write it) and meaning."""

    name: str
    field: str
    default: str | None
    meaning: str
    kind: str  # "gb" | "count" | "bool" | "path" | "seconds" | "port" | "host" | "url" | "secret"


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("DYN_KVBM_CPU_CACHE_GB", "cpu_cache_gb", None, "host memory (G2) cache size in GB", "gb"),
    EnvVar("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "cpu_cache_override_num_blocks", None,
           "G2 size in blocks; wins over DYN_KVBM_CPU_CACHE_GB", "count"),
    EnvVar("DYN_KVBM_DISK_CACHE_GB", "disk_cache_gb", None, "disk (G3) cache size in GB; needs a CPU tier", "gb"),
    EnvVar("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "disk_cache_override_num_blocks", None,
           "G3 size in blocks; wins over DYN_KVBM_DISK_CACHE_GB", "count"),
    EnvVar("DYN_KVBM_DISK_CACHE_DIR", "disk_cache_dir", "/tmp/", "directory of the disk cache files", "path"),
    EnvVar("DYN_KVBM_DISK_ZEROFILL_FALLBACK", "disk_zerofill_fallback", "false",
           "write zeros when fallocate() is unsupported (e.g. Lustre)", "bool"),
    EnvVar("DYN_KVBM_DISK_DISABLE_O_DIRECT", "disk_disable_o_direct", "false",
           "use buffered I/O instead of O_DIRECT (filesystems that refuse it, e.g. tmpfs)", "bool"),
    EnvVar("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "leader_worker_init_timeout_secs", "120",
           "seconds the leader and workers may take to allocate the tiers", "seconds"),
    EnvVar("DYN_KVBM_METRICS", "metrics", "false", "serve Prometheus metrics", "bool"),
    EnvVar("DYN_KVBM_METRICS_PORT", "metrics_port", "6880", "Prometheus metrics port", "port"),
    EnvVar("DYN_KVBM_METRICS_HOST", "metrics_host", "127.0.0.1",
           "address the metrics endpoint binds (0.0.0.0 to expose it)", "host"),
    EnvVar("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "disable_disk_offload_filter", "false",
           "offload every block evicted from CPU to disk (no SSD-lifespan frequency filter)", "bool"),
    EnvVar("DYN_KVBM_LAYERWISE", "layerwise", "true",
           "GPU engines: onboard host (G2) hits layer by layer, overlapped with the forward that uses them, and "
           "offload per layer (needs PIECEWISE CUDA graphs); false = whole-request transfers only", "bool"),
    EnvVar("DYN_KVBM_REMOTE_URL", "remote_url", None,
           "shared tier (G4) store: redis://[user:pass@]host:port/db, rediss:// (TLS), or file:///shared/dir; "
           "needs a CPU tier", "url"),
    EnvVar("DYN_KVBM_REMOTE_CACHE_GB", "remote_cache_gb", None,
           "size cap of a file:// shared tier in GB, enforced by the writers (Redis: the server's maxmemory)", "gb"),
    EnvVar("DYN_KVBM_REMOTE_SECRET", "remote_secret", None,
           "key of the MAC every shared-tier value carries; engines without it cannot plant KV", "secret"),
)


def _parse_bool(var: EnvVar, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{var.name}={raw!r} is not a boolean; set it to true or false")


def _parse_number(var: EnvVar, raw: str, example: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{var.name}={raw!r} is not a number; set it to {var.meaning}, e.g. {var.name}={example}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{var.name}={raw!r} is not a finite number; e.g. {var.name}={example}")
    if value < 0:
        raise ConfigError(f"{var.name}={raw!r} is negative; set it to 0 or more ({var.meaning}), e.g. {var.name}={example}")
    return value


def _parse_count(var: EnvVar, raw: str) -> int:
    text = raw.strip()
    if not text.isdigit():
        raise ConfigError(f"{var.name}={raw!r} is not a whole number of blocks; set it to e.g. {var.name}=1000, or unset it")
    return int(text)


def _parse_port(var: EnvVar, raw: str) -> int:
    text = raw.strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{var.name}={raw!r} is not a TCP port; set it to a number from 1 to 65535, e.g. {var.name}=6880")
    return int(text)


_PARSERS: dict[str, Callable[[EnvVar, str], object]] = {
    "gb": lambda v, r: _parse_number(v, r, "8"),
    "seconds": lambda v, r: _parse_number(v, r, "600"),
    "count": _parse_count,
    "bool": _parse_bool,
    "port": _parse_port,
    "path": lambda v, r: Path(r.strip() or "/tmp/"),
    "host": lambda v, r: r.strip() or "127.0.0.1",
    "url": lambda v, r: r.strip() or None,
    "secret": lambda v, r: SecretStr(r) if r else None,
}


def check_disk_dir(path: Path, var_name: str = "DYN_KVBM_DISK_CACHE_DIR") -> None:
    """Make sure `path` exists (creating it) and a file can be created in it; else one ConfigError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{var_name}={str(path)!r} cannot be created ({exc.strerror}); point it at a writable directory "
            f"on a fast local disk, e.g. {var_name}=/mnt/nvme/kvbm"
        ) from None
    if not path.is_dir():
        raise ConfigError(f"{var_name}={str(path)!r} is not a directory; point it at a directory, e.g. {var_name}=/mnt/nvme/kvbm")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kvbm-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{var_name}={str(path)!r} is not writable by this user ({exc.strerror}); "
            f"run `sudo chown $USER {path}` or choose another directory"
        ) from None


class KvbmConfig(BaseModel):
    """Validated KVBM settings. Built in every process that loads kvbm (API server, scheduler, workers)."""

    model_config = ConfigDict(frozen=True)

    cpu_cache_gb: float | None = None
    cpu_cache_override_num_blocks: int | None = None
    disk_cache_gb: float | None = None
    disk_cache_override_num_blocks: int | None = None
    disk_cache_dir: Path = Path("/tmp/")
    disk_zerofill_fallback: bool = False
    disk_disable_o_direct: bool = False
    leader_worker_init_timeout_secs: float = 120.0
    metrics: bool = False
    metrics_port: int = 6880
    metrics_host: str = "127.0.0.1"
    disable_disk_offload_filter: bool = False
    layerwise: bool = True
    remote_url: str | None = None
    remote_cache_gb: float | None = None
    remote_secret: SecretStr | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, check_paths: bool = True) -> "KvbmConfig":
        """Parse the DYN_KVBM_* variables of `env` (default: os.environ). Raises ConfigError on a bad value."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for var in ENV_VARS:
            raw = env.get(var.name)
            if raw is None or (raw.strip() == "" and var.kind in ("gb", "count")):
                continue
            values[var.field] = _PARSERS[var.kind](var, raw)
        config = cls(**values)
        if config.disk_requested and not config.host_requested:
            disk_var = "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS" if config.disk_cache_override_num_blocks else "DYN_KVBM_DISK_CACHE_GB"
            raise ConfigError(
                f"{disk_var}={env.get(disk_var)!r} needs a CPU tier: blocks reach disk through host memory; "
                "set DYN_KVBM_CPU_CACHE_GB (e.g. DYN_KVBM_CPU_CACHE_GB=8) too, or unset the disk size"
            )
        if config.remote_url and not config.host_requested:
            raise ConfigError(
                "DYN_KVBM_REMOTE_URL is set but needs a CPU tier: the shared tier stages blocks through host memory; "
                "set DYN_KVBM_CPU_CACHE_GB (e.g. DYN_KVBM_CPU_CACHE_GB=8) too, or unset DYN_KVBM_REMOTE_URL"
            )
        if check_paths and config.disk_requested:
            check_disk_dir(config.disk_cache_dir)
        return config

    @property
    def host_requested(self) -> bool:
        """True when a CPU tier of non-zero size was asked for."""
        return bool(self.cpu_cache_override_num_blocks) or bool(self.cpu_cache_gb)

    @property
    def disk_requested(self) -> bool:
        """True when a disk tier of non-zero size was asked for."""
        return bool(self.disk_cache_override_num_blocks) or bool(self.disk_cache_gb)

    def host_num_blocks(self, block_bytes: int) -> int:
        """G2 slots: the override when set, else floor(GB * 10^9 / block_bytes)."""
        return _num_blocks(self.cpu_cache_override_num_blocks, self.cpu_cache_gb, block_bytes)

    def disk_num_blocks(self, block_bytes: int) -> int:
        """G3 slots: the override when set, else floor(GB * 10^9 / block_bytes); 0 without a CPU tier."""
        if not self.host_requested:
            return 0
        return _num_blocks(self.disk_cache_override_num_blocks, self.disk_cache_gb, block_bytes)

    def explain(self, env: Mapping[str, str] | None = None) -> list[tuple[str, str | None, str, str]]:
        """Rows of (variable, raw value or None, value in effect, meaning)."""
        env = os.environ if env is None else env
        rows = []
        for var in ENV_VARS:
            value = getattr(self, var.field)
            rows.append((var.name, env.get(var.name), "unset" if value is None else str(value), var.meaning))
        return rows


def _num_blocks(override: int | None, gb: float | None, block_bytes: int) -> int:
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be positive, got {block_bytes}")
    if override is not None:
        return override
    if not gb:
        return 0
    return int(gb * BYTES_PER_GB) // block_bytes
