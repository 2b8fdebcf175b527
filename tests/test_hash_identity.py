"""The shared tier's identity check against vLLM itself: real VllmConfig objects for every hash algorithm and
seed setting, and the block hashes two real vLLM processes compute for the same tokens.

The check says a shared tier cannot work exactly when two processes' hashes differ: both sides are measured
(no engine needed: vLLM's own init_none_hash and hash_block_tokens, in two separate interpreters).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvbm.integrations.vllm.hash_identity import shared_tier_hash_problem

ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
SEEDS = (None, "0", "1234")
CASES = [(algo, seed) for algo in ALGOS for seed in SEEDS]

# One process: the hash of two chained blocks of the same tokens for every (algorithm, PYTHONHASHSEED) case,
# seeded the way vLLM's engine core seeds it (init_none_hash reads PYTHONHASHSEED when it runs).
HASHER = r"""
import json, os, sys
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core import kv_cache_utils as k
out = {}
for algo, seed in json.loads(sys.argv[1]):
    os.environ.pop("PYTHONHASHSEED", None)
    if seed is not None:
        os.environ["PYTHONHASHSEED"] = seed
    fn = get_hash_fn_by_name(algo)
    k.init_none_hash(fn)
    first = k.hash_block_tokens(fn, None, list(range(16)))
    second = k.hash_block_tokens(fn, first, list(range(16, 32)))
    out[f"{algo}/{seed}"] = bytes(second).hex()
print("HASHES" + json.dumps(out))
"""


def _hashes_of_one_process() -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    return subprocess.Popen([sys.executable, "-c", HASHER, json.dumps(CASES)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def two_processes() -> tuple[dict, dict]:
    procs = [_hashes_of_one_process() for _ in range(2)]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-2000:]
        line = next(x for x in stdout.splitlines() if x.startswith("HASHES"))
        out.append(json.loads(line[len("HASHES"):]))
    return out[0], out[1]


def _config(algo: str):
    from vllm.config import CacheConfig, VllmConfig

    return VllmConfig(cache_config=CacheConfig(prefix_caching_hash_algo=algo))


@pytest.mark.parametrize("algo,seed", CASES)
def test_the_check_flags_exactly_the_settings_whose_hashes_differ_across_processes(two_processes, algo, seed):
    a, b = two_processes
    env = {} if seed is None else {"PYTHONHASHSEED": seed}
    problem = shared_tier_hash_problem(_config(algo), env)
    key = f"{algo}/{seed}"
    assert (problem is None) == (a[key] == b[key]), (key, problem, a[key], b[key])


def test_the_two_processes_disagree_somewhere_and_agree_somewhere(two_processes):
    """Negative control for the comparison itself: random seeding is really seen (xxhash, no seed), and a fixed
    seed really changes the hash (the same seed in both processes, a different hash from another seed)."""
    a, b = two_processes
    assert a["xxhash/None"] != b["xxhash/None"] and a["xxhash_cbor/None"] != b["xxhash_cbor/None"]
    assert a["sha256/None"] == b["sha256/None"] and a["xxhash/0"] == b["xxhash/0"]
    assert a["sha256/0"] != a["sha256/1234"] != a["sha256/None"]


def test_the_line_names_the_fix_and_the_default_has_no_problem():
    problem = shared_tier_hash_problem(_config("xxhash"), {})
    assert problem is not None and "\n" not in problem
    assert "PYTHONHASHSEED" in problem and "--prefix-caching-hash-algo sha256" in problem and "G4" in problem
    from vllm.config import VllmConfig

    assert shared_tier_hash_problem(VllmConfig(), {}) is None  # vLLM's default: sha256, fixed seed


def test_the_check_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    assert shared_tier_hash_problem(_config("xxhash_cbor")) is not None
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    assert shared_tier_hash_problem(_config("xxhash_cbor")) is None
