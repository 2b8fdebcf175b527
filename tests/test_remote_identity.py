"""The shared tier (G4) is turned off at start-up, with one line naming the fix, when this engine's block hashes
could never match another engine's (xxhash seeded at random per process); sha256 is the negative control.
The real scheduler-side connector on a real VllmConfig and a real shared directory (file://); no engine."""

from __future__ import annotations

import logging

import pytest

VBS = 16


@pytest.mark.parametrize("algo, shared", [("xxhash", False), ("sha256", True)])
def test_the_shared_tier_is_disabled_when_block_hashes_cannot_match_across_engines(tmp_path, monkeypatch, caplog,
                                                                                    algo, shared):
    from vllm.config import CacheConfig, KVTransferConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvbm.integrations.vllm.connector import KvbmConnector, KvbmHandshakeMetadata
    from kvbm.protocol import Handshake
    from vllm_layouts import vllm_kv_caches

    pytest.importorskip("xxhash")
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "8")
    monkeypatch.setenv("DYN_KVBM_REMOTE_URL", (tmp_path / "shared").as_uri())
    for var in ("DYN_KVBM_CPU_CACHE_GB", "DYN_KVBM_DISK_CACHE_GB", "PYTHONHASHSEED", "DYN_KVBM_REMOTE_SECRET"):
        monkeypatch.delenv(var, raising=False)
    kv_cache_config, _ = vllm_kv_caches("LBHNC", num_layers=2, num_blocks=12, block_size=VBS, num_kv_heads=1,
                                        head_size=64)
    cfg = VllmConfig(cache_config=CacheConfig(block_size=VBS, prefix_caching_hash_algo=algo),
                     kv_transfer_config=KVTransferConfig(kv_connector="DynamoConnector", kv_role="kv_both",
                                                         kv_connector_module_path="kvbm.vllm_integration.connector"))
    logging.getLogger("kvbm").addHandler(caplog.handler)  # kvbm's logger does not propagate (vLLM's processes)
    with caplog.at_level(logging.WARNING, logger="kvbm"):
        conn = KvbmConnector(cfg, KVConnectorRole.SCHEDULER, kv_cache_config)
        leader = conn.leader
        hs = Handshake(rank=0, world_size=1, block_size=leader.block_size, block_bytes=leader.block_bytes,
                       host_slots=leader.manager.host.num_slots, disk_slots=0, remote_fingerprint=b"f" * 16)
        conn.set_xfer_handshake_metadata({0: KvbmHandshakeMetadata(hs)})
    try:
        lines = [r.getMessage() for r in caplog.records if "PYTHONHASHSEED" in r.getMessage()]
        if shared:
            assert leader.remote is not None and not lines
        else:
            assert leader.remote is None  # no lookups and no writes: the leader plans G4 traffic only with an index
            assert len(set(lines)) == 1 and "--prefix-caching-hash-algo sha256" in lines[0], lines
    finally:
        logging.getLogger("kvbm").removeHandler(caplog.handler)
        if leader.remote is not None:
            leader.remote.close()
