"""kvbm's tier events as vLLM KV events (BlockStored / BlockRemoved), for `--kv-events-config` publishers.

vLLM's scheduler drains `take_events()` of the scheduler-side connector once per step and publishes the events
next to its own G1 events (ZMQ, `--kv-events-config`). The leader's policy records plain TierEvents (kvbm.events);
this module adds what a router needs besides the hash: the parent block hash, the block's token ids, LoRA and
extra keys, exactly as vLLM's own G1 BlockStored carries them (the same engine block hash, converted the same
way), so a router joins a block's G1, G2 and G3 residencies on one key.

A block's payload is snapshotted while vLLM's Request object is alive (when the step plan stores the block) and
kept while the block is in any kvbm tier; a block that leaves every tier keeps it a little longer (a bounded
list), since a G2 eviction that cascades to G3 is stored on disk only when the copy is done.

Media (vLLM's names; `locality` says whose it is):
  G2 host memory   medium "CPU",     locality "LOCAL"   (as vLLM's OffloadingConnector tags its CPU tier)
  G3 local disk    medium "STORAGE", locality "LOCAL"   (vLLM's name for its file-system / disk tiers)
  G4 shared store  medium "STORAGE", locality "REMOTE"

Operations:
  KvEvents.enabled(vllm_config)   True when vLLM publishes KV events (--kv-events-config enable_kv_cache_events)
  KvEvents(log, block_size)       log: the TierEventLog attached to the leader's TierManager
  track(request) / forget(req_id) the live Request of a request the leader may store blocks of
  snapshot(plan)                  payloads of the blocks this step plan stores into G2 (or loads)
  take()                          the log's events as vLLM KVCacheEvents
"""

from __future__ import annotations

import logging
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable

from vllm.distributed.kv_events import MEDIUM_CPU, MEDIUM_STORAGE, BlockRemoved, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys, maybe_convert_block_hash, to_event_extra_keys

from kvbm.events import EventKind, TierEventLog
from kvbm.protocol import StepPlan

log = logging.getLogger("kvbm.vllm")

MEDIA = {"G2": (MEDIUM_CPU, "LOCAL"), "G3": (MEDIUM_STORAGE, "LOCAL"), "G4": (MEDIUM_STORAGE, "REMOTE")}
MAX_UNHELD = 65_536  # payloads of blocks in no tier (stores in flight, cascades in flight) kept at most


@dataclass
class _Payload:
    parent: Hashable | None
    token_ids: array
    lora_id: int | None
    lora_name: str | None
    extra_keys: tuple | None
    tiers: set[str] = field(default_factory=set)


class KvEvents:
    """Converts the leader's tier events into vLLM KV events, with the payload vLLM's own G1 events carry."""

    @staticmethod
    def enabled(vllm_config) -> bool:
        """True when this engine publishes KV events (otherwise vLLM never drains take_events usefully)."""
        cfg = getattr(vllm_config, "kv_events_config", None)
        return bool(cfg is not None and cfg.enable_kv_cache_events)

    def __init__(self, tier_log: TierEventLog, block_size: int, max_unheld: int = MAX_UNHELD):
        self.log = tier_log
        self.block_size = block_size
        self.max_unheld = max_unheld
        self.num_placeholders = 0  # stored blocks published without tokens (their payload was lost)
        self._requests: dict[str, Any] = {}
        self._payloads: dict[Hashable, _Payload] = {}
        self._unheld: OrderedDict[Hashable, None] = OrderedDict()  # payloads of blocks in no tier, oldest first

    # ---- payloads ------------------------------------------------------------------------------------------

    def track(self, request) -> None:
        """Remember the live Request (its token ids grow with it) until the request finishes."""
        self._requests[request.request_id] = request

    def forget(self, req_id: str) -> None:
        """The request finished: the leader plans no more stores of its blocks."""
        self._requests.pop(req_id, None)

    def snapshot(self, plan: StepPlan) -> None:
        """Capture the payload of every block this step's plan stores into G2, or loads (a block staged from a
        shared tier enters G2 without a store of this engine), while its Request is alive."""
        for req_id, moves in [(s.req_id, s.stores) for s in plan.stores] + [(s.req_id, s.moves) for s in plan.loads]:
            request = self._requests.get(req_id)
            if request is None or not moves:
                continue
            hashes = request.block_hashes
            pos = -1
            for move in moves:
                if move.block_hash in self._payloads:
                    continue
                try:
                    pos = hashes.index(move.block_hash, pos + 1)
                except ValueError:  # not after the previous block: search the whole list
                    try:
                        pos = hashes.index(move.block_hash)
                    except ValueError:
                        continue
                self._add(move.block_hash, self._payload_of(request, pos))

    def _payload_of(self, request, pos: int) -> _Payload:
        bs = self.block_size
        start, end = pos * bs, (pos + 1) * bs
        extra, _ = generate_block_hash_extra_keys(request, start, end, 0)
        lora = request.lora_request
        return _Payload(request.block_hashes[pos - 1] if pos > 0 else None,
                        array("q", request.all_token_ids[start:end]),
                        lora.adapter_id if lora else None, lora.name if lora else None, extra)

    def _add(self, block_hash: Hashable, payload: _Payload) -> None:
        self._payloads[block_hash] = payload
        self._unhold(block_hash)

    def _unhold(self, block_hash: Hashable) -> None:
        """The block is in no tier now; keep its payload a while (a store or cascade may be in flight)."""
        self._unheld[block_hash] = None
        self._unheld.move_to_end(block_hash)
        while len(self._unheld) > self.max_unheld:
            old, _ = self._unheld.popitem(last=False)
            self._payloads.pop(old, None)

    # ---- events --------------------------------------------------------------------------------------------

    def take(self) -> list[KVCacheEvent]:
        """The tier events since the last call, as BlockStored / BlockRemoved (in the order they happened)."""
        out: list[KVCacheEvent] = []
        for event in self.log.take():
            medium, locality = MEDIA.get(event.tier, (event.tier, None))
            if event.kind is EventKind.REMOVED:
                for h in event.block_hashes:
                    p = self._payloads.get(h)
                    if p is not None:
                        p.tiers.discard(event.tier)
                        if not p.tiers:
                            self._unhold(h)
                out.append(BlockRemoved(block_hashes=[maybe_convert_block_hash(h) for h in event.block_hashes],
                                        medium=medium, group_idx=0, locality=locality))
                continue
            for h in event.block_hashes:
                p = self._payloads.get(h)
                if p is not None:
                    p.tiers.add(event.tier)
                    self._unheld.pop(h, None)
            out.extend(self._stored(event.block_hashes, medium, locality))
        return out

    def _stored(self, hashes: tuple, medium: str, locality: str | None) -> list[BlockStored]:
        """One BlockStored per run of chained blocks (each one's parent is the previous), as vLLM's G1 does."""
        out = []
        run: list[tuple[Hashable, _Payload | None]] = []
        for h in hashes:
            p = self._payloads.get(h)
            if run and not (p is not None and run[-1][1] is not None and p.parent == run[-1][0]
                            and p.lora_name == run[-1][1].lora_name):
                out.append(self._event(run, medium, locality))
                run = []
            run.append((h, p))
        if run:
            out.append(self._event(run, medium, locality))
        return out

    def _event(self, run: list, medium: str, locality: str | None) -> BlockStored:
        first = run[0][1]
        if first is None:  # payload lost (evicted from the bounded list): vLLM's placeholder shape
            self.num_placeholders += len(run)
            return BlockStored(block_hashes=[maybe_convert_block_hash(h) for h, _ in run], parent_block_hash=None,
                               token_ids=[], block_size=0, lora_id=None, medium=medium, lora_name=None,
                               group_idx=0, locality=locality)
        tokens: list[int] = []
        for _, p in run:
            tokens.extend(p.token_ids)
        return BlockStored(
            block_hashes=[maybe_convert_block_hash(h) for h, _ in run],
            parent_block_hash=maybe_convert_block_hash(first.parent) if first.parent is not None else None,
            token_ids=tokens, block_size=self.block_size, lora_id=first.lora_id, medium=medium,
            lora_name=first.lora_name, extra_keys=to_event_extra_keys([p.extra_keys for _, p in run]),
            group_idx=0, locality=locality)
