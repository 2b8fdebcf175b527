"""Mechanism: moves the bytes the policy decided (torch, files, NIXL). The only layer that imports them."""

from kvbm.mechanism.disk import DiskTier
from kvbm.mechanism.host import HostTier
from kvbm.mechanism.layout import KVLayout
from kvbm.mechanism.transfer import BlockMove, JobResult, OffloadJob, OnboardJob, SlotCopy, TransferEngine

__all__ = ["BlockMove", "DiskTier", "HostTier", "JobResult", "KVLayout", "OffloadJob", "OnboardJob", "SlotCopy",
           "TransferEngine"]
