"""`kvbm doctor` and `kvbm doctor disk` on real directories and filesystems, as a user runs them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvbm.mechanism.fileio import CACHE_FILE_PREFIX
from kvbm_runner import run_kvbm

SMALL = ("--size", "4", "--random-reads", "8", "--block-bytes", "65536")  # 4 MiB scratch file: fast on 2 cores


def checks_of(stdout: str) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(stdout)["checks"]}


@pytest.fixture
def mounted(tmp_path):
    """Mount a filesystem at a fresh directory (root only); unmount afterwards; skip when mounting fails."""
    points = []

    def mount(fstype: str, options: str = "") -> Path:
        point = tmp_path / f"mnt-{fstype}-{len(points)}"
        point.mkdir()
        cmd = ["mount", "-t", fstype] + (["-o", options] if options else []) + ["none", str(point)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount {fstype} here (needs root): {done.stderr.strip()}")
        points.append(point)
        return point

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", str(point)], check=False)


def test_disk_check_on_a_real_directory_measures_and_cleans_up(tmp_path):
    target = tmp_path / "kvbm-cache"  # does not exist yet: doctor creates it
    result = run_kvbm("doctor", "disk", "--dir", str(target), *SMALL, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["verdict"].endswith(": OK") or "warning" in report["verdict"]
    checks = checks_of(result.stdout)
    assert checks["directory"]["status"] == "ok" and "created" in checks["directory"]["detail"]
    assert checks["fallocate"]["status"] in ("ok", "fail")
    speed = report["throughput"]
    assert speed["bytes"] == 4 << 20 and speed["num_random_reads"] == 8
    assert speed["seq_write_bytes_per_s"] > 0 and speed["seq_read_bytes_per_s"] > 0 and speed["random_read_bytes_per_s"] > 0
    assert list(target.iterdir()) == []  # the scratch file is gone


def test_table_output_and_verdict_line(tmp_path):
    result = run_kvbm("doctor", "disk", "--dir", str(tmp_path), *SMALL)
    assert result.exit_code == 0, result.stderr
    for text in ("filesystem", "O_DIRECT", "sequential write", "random block reads", "stale cache files"):
        assert text in result.stdout
    assert f"disk cache directory {tmp_path}: OK" in result.stdout


def test_doctor_json_feeds_kvbm_size(tmp_path):
    result = run_kvbm("doctor", "disk", "--dir", str(tmp_path), *SMALL, "--json")
    report = tmp_path / "disk.json"
    report.write_text(result.stdout)
    size = run_kvbm("size", "--model", "Qwen/Qwen3-4B", "--cpu-gb", "1", "--disk-gb", "1",
                    "--doctor-json", str(report), "--json")
    assert size.exit_code == 0, size.stderr
    disk = next(b for b in json.loads(size.stdout)["break_even"] if b["tier"] == "disk")
    measured = json.loads(result.stdout)["throughput"]["random_read_bytes_per_s"]
    assert disk["bytes_per_s"] == pytest.approx(min(measured, 55.1e9))


def test_a_file_where_the_directory_should_be_fails(tmp_path):
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    result = run_kvbm("doctor", "disk", "--dir", str(not_dir / "cache"), *SMALL)
    assert result.exit_code == 1
    assert "directory" in result.stdout and "fail" in result.stdout
    assert result.stderr.startswith("kvbm: disk cache directory") and "check(s) failed (directory)" in result.stderr


def test_unwritable_directory_fails_with_the_fix(tmp_path, mounted):
    if os.geteuid() == 0:
        target = mounted("tmpfs", "ro,size=1m")  # root writes through mode bits; a read-only mount it cannot
    else:
        target = tmp_path / "locked"
        target.mkdir(mode=0o500)
    result = run_kvbm("doctor", "disk", "--dir", str(target), *SMALL, "--json")
    assert result.exit_code == 1
    directory = checks_of(result.stdout)["directory"]
    assert directory["status"] == "fail"
    assert "is not writable by this user" in directory["detail"] and "chown" in directory["detail"]


def test_filesystem_refusing_o_direct_suggests_disabling_it(mounted):
    # ramfs refuses O_DIRECT (tmpfs accepts it on this kernel) and has no fallocate.
    target = mounted("ramfs")
    result = run_kvbm("doctor", "disk", "--dir", str(target), *SMALL, "--json", env={
        "DYN_KVBM_DISK_DISABLE_O_DIRECT": None, "DYN_KVBM_DISK_ZEROFILL_FALLBACK": None})
    assert result.exit_code == 1
    checks = checks_of(result.stdout)
    assert checks["O_DIRECT"]["status"] == "fail"
    assert checks["O_DIRECT"]["fix"] == "set DYN_KVBM_DISK_DISABLE_O_DIRECT=true"
    assert checks["filesystem"]["detail"].startswith("ramfs")
    if checks["fallocate"]["status"] == "fail":
        assert checks["fallocate"]["fix"] == "set DYN_KVBM_DISK_ZEROFILL_FALLBACK=true"
    assert "O_DIRECT" in result.stderr

    fixed = run_kvbm("doctor", "disk", "--dir", str(target), *SMALL, "--json", env={
        "DYN_KVBM_DISK_DISABLE_O_DIRECT": "true", "DYN_KVBM_DISK_ZEROFILL_FALLBACK": "true"})
    assert fixed.exit_code == 0, fixed.stdout
    checks = checks_of(fixed.stdout)
    assert checks["O_DIRECT"]["status"] == "warn"
    assert "buffered" in checks["sequential read"]["detail"]
    assert json.loads(fixed.stdout)["throughput"]["direct"] is False


def test_too_small_filesystem_fails_free_space(mounted):
    target = mounted("tmpfs", "size=1m")
    result = run_kvbm("doctor", "disk", "--dir", str(target), *SMALL, "--disk-gb", "1", "--json")
    assert result.exit_code == 1
    checks = checks_of(result.stdout)
    assert checks["free space"]["status"] == "fail"
    assert "lower DYN_KVBM_DISK_CACHE_GB" in checks["free space"]["fix"]
    assert checks["throughput"]["status"] == "warn"  # no room for the scratch file: skipped, not crashed


def test_stale_cache_files_are_found_and_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace("-", "_") or "host"
    stale = tmp_path / f"{CACHE_FILE_PREFIX}{host}-pid{dead.pid}-r0-0123abcd.kvbm"
    stale.write_bytes(b"\0" * 4096)
    live = tmp_path / f"{CACHE_FILE_PREFIX}{host}-pid{os.getpid()}-r0-0123abcd.kvbm"
    live.write_bytes(b"\0" * 4096)
    result = run_kvbm("doctor", "disk", "--dir", str(tmp_path), "--size", "0", "--json")
    check = checks_of(result.stdout)["stale cache files"]
    assert check["status"] == "warn" and stale.name in check["detail"] and "--remove-stale" in check["fix"]
    result = run_kvbm("doctor", "disk", "--dir", str(tmp_path), "--size", "0", "--remove-stale", "--json")
    assert "removed 1 file(s)" in checks_of(result.stdout)["stale cache files"]["detail"]
    assert not stale.exists() and live.exists()


def test_dir_defaults_to_dyn_kvbm_disk_cache_dir(tmp_path):
    result = run_kvbm("doctor", "disk", "--size", "0", "--json", env={"DYN_KVBM_DISK_CACHE_DIR": str(tmp_path)})
    assert json.loads(result.stdout)["dir"] == str(tmp_path)


def test_bad_options_exit_2(tmp_path):
    result = run_kvbm("doctor", "disk", "--dir", str(tmp_path), "--size", "-1")
    assert result.exit_code == 2 and result.stderr.startswith("kvbm: ")


# ------------------------------------------------------------------------------------------ environment


def clean_env(**values: str) -> dict[str, str | None]:
    env: dict[str, str | None] = {name: None for name in os.environ if name.startswith("DYN_KVBM_")}
    env.update(values)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_environment_explains_every_variable():
    from kvbm.config import ENV_VARS

    result = run_kvbm("doctor", "--json", "--port", str(free_port()), env=clean_env(DYN_KVBM_CPU_CACHE_GB="0.5"))
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    rows = {r["name"]: r for r in report["variables"]}
    assert set(rows) == {v.name for v in ENV_VARS}
    assert rows["DYN_KVBM_CPU_CACHE_GB"]["raw"] == "0.5" and rows["DYN_KVBM_CPU_CACHE_GB"]["value"] == "0.5"
    assert rows["DYN_KVBM_METRICS_PORT"]["value"] == "6880"
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("RAM", "pinned memory limit", "GPU / CUDA", "vLLM", "nixl", "torch", "metrics port", "serve port"):
        assert name in checks
    assert checks["RAM"]["status"] == "ok" and "0.5 GB" in checks["RAM"]["detail"]
    table = run_kvbm("doctor", "--port", str(free_port()), env=clean_env())
    assert "DYN_KVBM_DISK_ZEROFILL_FALLBACK" in table.stdout and "environment: OK" in table.stdout


def test_bad_variable_is_named_and_fails():
    result = run_kvbm("doctor", "--json", env=clean_env(DYN_KVBM_CPU_CACHE_GB="lots", DYN_KVBM_METRICS="maybe"))
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert "is not a number" in checks["DYN_KVBM_CPU_CACHE_GB"]["detail"]
    assert "is not a boolean" in checks["DYN_KVBM_METRICS"]["detail"]
    rows = {r["name"]: r for r in report["variables"]}
    assert rows["DYN_KVBM_CPU_CACHE_GB"]["value"] == "invalid"
    assert rows["DYN_KVBM_METRICS_PORT"]["value"] == "6880"  # the others are still explained
    assert result.stderr.startswith("kvbm: environment: 2 check(s) failed")


def test_cpu_cache_larger_than_ram_fails_with_a_size_that_fits():
    result = run_kvbm("doctor", "--json", env=clean_env(DYN_KVBM_CPU_CACHE_GB="1000000"))
    assert result.exit_code == 1
    ram = checks_of(result.stdout)["RAM"]
    assert ram["status"] == "fail" and ram["fix"].startswith("lower DYN_KVBM_CPU_CACHE_GB to at most")


def test_busy_metrics_port_is_reported():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_kvbm("doctor", "--json", "--port", str(port),
                          env=clean_env(DYN_KVBM_METRICS="true", DYN_KVBM_METRICS_PORT=str(port)))
    assert result.exit_code == 1
    checks = checks_of(result.stdout)
    assert checks["metrics port"]["status"] == "fail" and "in use" in checks["metrics port"]["detail"]
    assert f"DYN_KVBM_METRICS_PORT={port + 1}" in checks["metrics port"]["fix"]
    assert checks["serve port"]["status"] == "warn"


def test_unwritable_disk_cache_dir_in_environment(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_kvbm("doctor", "--json", env=clean_env(DYN_KVBM_CPU_CACHE_GB="0.1", DYN_KVBM_DISK_CACHE_GB="0.1",
                                                        DYN_KVBM_DISK_CACHE_DIR=str(blocker / "sub")))
    assert result.exit_code == 1
    assert checks_of(result.stdout)["disk cache dir"]["status"] == "fail"
