"""DYN_KVBM_* configuration: Dynamo's meanings and defaults, and one clear error per bad value."""

import os
import subprocess

import pytest

from kvbm.config import BYTES_PER_GB, KvbmConfig
from kvbm.errors import ConfigError


def test_defaults_match_dynamo():
    c = KvbmConfig.from_env({})
    assert (c.cpu_cache_gb, c.disk_cache_gb, str(c.disk_cache_dir)) == (None, None, "/tmp")
    assert (c.metrics, c.metrics_port, c.metrics_host) == (False, 6880, "127.0.0.1")
    assert c.leader_worker_init_timeout_secs == 120
    assert not (c.disk_zerofill_fallback or c.disk_disable_o_direct or c.disable_disk_offload_filter)
    assert not c.host_requested and c.host_num_blocks(1000) == 0


def test_sizes_in_gb_of_ten_to_the_ninth_bytes_and_block_overrides(tmp_path):
    c = KvbmConfig.from_env({"DYN_KVBM_CPU_CACHE_GB": "2.5", "DYN_KVBM_DISK_CACHE_GB": "10",
                             "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path / "new" / "dir")})
    assert c.host_num_blocks(2_359_296) == int(2.5 * BYTES_PER_GB) // 2_359_296 == 1059
    assert c.disk_num_blocks(2_359_296) == 10 * BYTES_PER_GB // 2_359_296
    assert (tmp_path / "new" / "dir").is_dir(), "the cache directory is created"
    c = KvbmConfig.from_env({"DYN_KVBM_CPU_CACHE_GB": "2.5", "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "1000",
                             "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "5000"}, check_paths=False)
    assert (c.host_num_blocks(123), c.disk_num_blocks(123)) == (1000, 5000)


@pytest.mark.parametrize("value,truth", [("true", True), ("1", True), ("TRUE", True), ("yes", True),
                                         ("false", False), ("0", False), ("off", False)])
def test_booleans(value, truth):
    assert KvbmConfig.from_env({"DYN_KVBM_DISK_DISABLE_O_DIRECT": value}).disk_disable_o_direct is truth


@pytest.mark.parametrize("env,needle", [
    ({"DYN_KVBM_CPU_CACHE_GB": "abc"}, "DYN_KVBM_CPU_CACHE_GB='abc' is not a number; set it to host memory"),
    ({"DYN_KVBM_CPU_CACHE_GB": "-4"}, "DYN_KVBM_CPU_CACHE_GB='-4' is negative"),
    ({"DYN_KVBM_CPU_CACHE_GB": "nan"}, "is not a finite number"),
    ({"DYN_KVBM_DISK_CACHE_GB": "100"}, "DYN_KVBM_DISK_CACHE_GB='100' needs a CPU tier"),
    ({"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "1e3"}, "is not a whole number of blocks"),
    ({"DYN_KVBM_METRICS": "maybe"}, "DYN_KVBM_METRICS='maybe' is not a boolean; set it to true or false"),
    ({"DYN_KVBM_METRICS_PORT": "70000"}, "DYN_KVBM_METRICS_PORT='70000' is not a TCP port"),
])
def test_bad_values_give_one_error_naming_variable_value_and_fix(env, needle):
    with pytest.raises(ConfigError) as err:
        KvbmConfig.from_env(env)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_directory_that_cannot_be_used_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {"DYN_KVBM_CPU_CACHE_GB": "1", "DYN_KVBM_DISK_CACHE_GB": "1", "DYN_KVBM_DISK_CACHE_DIR": str(blocker / "sub")}
    with pytest.raises(ConfigError, match=r"DYN_KVBM_DISK_CACHE_DIR='.*sub' cannot be created"):
        KvbmConfig.from_env(env)


def test_an_unwritable_directory_is_named(tmp_path):
    """A read-only filesystem refuses even root, so this runs for real when mounting is allowed."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(mnt)], capture_output=True).returncode:
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs here (root would write anywhere else)")
        mnt.chmod(0o500)
    try:
        env = {"DYN_KVBM_CPU_CACHE_GB": "1", "DYN_KVBM_DISK_CACHE_GB": "1", "DYN_KVBM_DISK_CACHE_DIR": str(mnt)}
        with pytest.raises(ConfigError, match=r"is not writable by this user .*choose another directory"):
            KvbmConfig.from_env(env)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_doctor_explains_every_variable():
    rows = KvbmConfig.from_env({"DYN_KVBM_CPU_CACHE_GB": "8"}).explain({"DYN_KVBM_CPU_CACHE_GB": "8"})
    names = [r[0] for r in rows]
    assert "DYN_KVBM_CPU_CACHE_GB" in names and "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER" in names
    assert rows[names.index("DYN_KVBM_CPU_CACHE_GB")][1:3] == ("8", "8.0")
