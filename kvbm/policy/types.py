"""Identities shared by the policy and the mechanism: block hashes, tiers, locations.

Operations: none (types only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, NewType

from kvbm.protocol import Tier  # noqa: F401 (the tier names travel to the workers; defined there)

# The engine's chained block hash (vLLM hands it over as `request.block_hashes`): the identity of a block's
# token content *and* everything before it. Any hashable value works; vLLM's are bytes.
BlockHash = NewType("BlockHash", Hashable)


@dataclass(frozen=True)
class Location:
    """One block in one kvbm tier: the hash and its slot index in that tier's pool."""

    block_hash: BlockHash
    tier: Tier
    slot: int
