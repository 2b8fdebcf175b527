"""kvbm: a tiered KV-cache block manager for LLM serving engines.

Completed KV blocks are offloaded from the engine's cache (G1) to host memory (G2) and local disk (G3),
found again by their chained block hash, and onboarded back instead of recomputed.

Layers (they do not reach into each other's insides):
  kvbm.policy     which blocks exist where (pure Python: no bytes, no torch)
  kvbm.mechanism  moving the bytes the policy decided (torch, files, NIXL)
  kvbm.integrations.vllm  the vLLM v1 KV connector
"""

from kvbm.errors import ConfigError, KvbmError, StorageError, TransferError

__version__ = "0.1.0"

__all__ = ["ConfigError", "KvbmError", "StorageError", "TransferError", "__version__"]
