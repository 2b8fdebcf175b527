"""Identities shared by the policy and the mechanism: block hashes, tiers, locations.

Operations: none (types only).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Hashable, NewType

# The engine's chained block hash (vLLM hands it over as `request.block_hashes`): the identity of a block's
# token content *and* everything before it. Any hashable value works; vLLM's are bytes.
BlockHash = NewType("BlockHash", Hashable)


class Tier(enum.Enum):
    """Where a block lives. G1 is the engine's own cache, which kvbm does not index."""

    G1 = "G1"  # engine cache (GPU or CPU)
    G2 = "G2"  # host memory
    G3 = "G3"  # local disk

    @property
    def label(self) -> str:
        """Human name: device, host, disk."""
        return {"G1": "device", "G2": "host", "G3": "disk"}[self.value]


@dataclass(frozen=True)
class Location:
    """One block in one kvbm tier: the hash and its slot index in that tier's pool."""

    block_hash: BlockHash
    tier: Tier
    slot: int
