"""Policy: which blocks exist where. Pure Python: imports neither torch nor OS-level I/O (a test keeps it so)."""

from kvbm.policy.filter import AdmitAll, FrequencyFilter
from kvbm.policy.manager import Cascade, OffloadPlan, PolicyStats, TierManager
from kvbm.policy.pool import Allocation, BlockPool, PoolFullError
from kvbm.policy.types import BlockHash, Location, Tier

__all__ = ["AdmitAll", "Allocation", "BlockHash", "BlockPool", "Cascade", "FrequencyFilter", "Location",
           "OffloadPlan", "PolicyStats", "PoolFullError", "Tier", "TierManager"]
