"""Can another engine process find this engine's blocks by hash? (the shared tier's identity requirement)

A block's identity is vLLM's chained block hash, which starts from NONE_HASH, derived from a seed
(vllm/v1/core/kv_cache_utils.py, vLLM 0.32): PYTHONHASHSEED when set; otherwise, for the cryptographic
algorithms (`--prefix-caching-hash-algo sha256`, the default, or `sha256_cbor`) a fixed default seed, the same
in every process; for the non-cryptographic ones (`xxhash`, `xxhash_cbor`) random bytes per process. So two
engines compute the same hash for the same tokens unless they use xxhash without PYTHONHASHSEED (and, always,
only when they use the same algorithm and the same PYTHONHASHSEED or none at all, which no process can check
alone). A shared tier (G4) whose hashes never match another engine's is pure cost: kvbm turns it off.

The local tiers are not concerned: G2 lives in the process's memory and G3's file is created by the process
and removed when it exits (a stale file of a dead process is deleted at start-up, never read), so a block is
only ever looked up by the process that hashed it.

Operations:
  shared_tier_hash_problem(vllm_config, environ=None)  one line (what is wrong, how to fix it) or None
"""

from __future__ import annotations

import os
from typing import Mapping

# vLLM 0.32's algorithms that seed NONE_HASH randomly per process unless PYTHONHASHSEED is set.
_RANDOM_SEEDED = frozenset({"xxhash", "xxhash_cbor"})


def _random_seeded(algo: str) -> bool:
    """vLLM's own classification when it has one (kv_cache_utils._NON_CRYPTO_HASH_FUNCTIONS), else ours."""
    try:
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core import kv_cache_utils

        return get_hash_fn_by_name(algo) in kv_cache_utils._NON_CRYPTO_HASH_FUNCTIONS
    except (ImportError, AttributeError, ValueError):
        return algo in _RANDOM_SEEDED


def shared_tier_hash_problem(vllm_config, environ: Mapping[str, str] | None = None) -> str | None:
    """Why block hashes of this engine cannot match another engine's (one line, naming the fix), or None when
    they can. `environ` is the engine's environment (default: this process's, which vLLM's engine core
    inherits)."""
    env = os.environ if environ is None else environ
    algo = str(getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "sha256"))
    if _random_seeded(algo) and env.get("PYTHONHASHSEED") is None:
        return (f"kvbm: --prefix-caching-hash-algo {algo} seeds block hashes randomly in every process, so no other "
                f"engine could find this one's blocks in the shared tier (G4): start every engine with the same "
                f"PYTHONHASHSEED (e.g. PYTHONHASHSEED=0) or use --prefix-caching-hash-algo sha256; "
                f"G4 is disabled for now")
    return None
