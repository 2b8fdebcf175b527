"""KVBM as a vLLM v1 KV connector.

    --kv-transfer-config '{"kv_connector":"DynamoConnector","kv_role":"kv_both",
                           "kv_connector_module_path":"kvbm.vllm_integration.connector"}'

Configured by the DYN_KVBM_* variables. The scheduler-role instance owns the leader (the tier index and every
slot decision); each worker-role instance owns one rank's tiers and moves bytes. A cache is best effort:
a failed or corrupt load is recomputed (requires_kv_delivery False, kv_load_failure_policy "recompute").

Operations (vLLM calls them; see docs/vllm-0.32-connector-notes.md for who calls what, when):
  scheduler: get_num_new_matched_tokens, update_state_after_alloc, get_external_cache_hit_sources,
             build_connector_meta, update_connector_output, request_finished, set_xfer_handshake_metadata,
             take_events, shutdown
  worker:    register_kv_caches, get_handshake_metadata, handle_preemptions, start_load_kv,
             wait_for_layer_load, save_kv_layer, wait_for_save, get_finished, get_block_ids_with_load_errors,
             build_connector_worker_meta, shutdown

The request lifecycle (kvbm.leader) decides who frees the engine's blocks: vLLM is asked to hold them only
while a store reads them, and a call in an unexpected order is answered with a miss, never with a load into
blocks nobody matched. At start-up the workers' geometry is checked against the leader's (handshake).

The shared tier (G4, DYN_KVBM_REMOTE_URL): each worker opens its store (keys carry its rank's fingerprint)
and reports the fingerprint in the handshake; the leader then gets an index of those stores for its
asynchronous lookups, and `get_num_new_matched_tokens` answers None ("ask again later") while one is pending.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from kvbm.config import KvbmConfig
from kvbm.events import TierEventLog
from kvbm.integrations.vllm import compat, hash_identity, plugin
from kvbm.integrations.vllm.kv_events import KvEvents
from kvbm.integrations.vllm.stats import KvbmPromMetrics, KvbmStats
from kvbm.leader import KvbmLeader
from kvbm.mechanism import KVLayout
from kvbm.policy import AdmitAll, FrequencyFilter, TierManager
from kvbm.protocol import Handshake, StepPlan, WorkerReport
from kvbm.worker import KvbmWorker

log = logging.getLogger("kvbm.vllm")


class KvbmConnectorMetadata(KVConnectorMetadata):
    """One step's plan, scheduler -> workers (pickled by vLLM)."""

    def __init__(self, plan: StepPlan):
        self.plan = plan


class KvbmHandshakeMetadata(KVConnectorHandshakeMetadata):
    """One worker's geometry, worker -> scheduler once at start-up (vLLM's handshake channel)."""

    def __init__(self, handshake: Handshake):
        self.handshake = handshake


class KvbmWorkerMetadata(KVConnectorWorkerMetadata):
    """Finished jobs, workers -> scheduler; vLLM merges the ranks' reports with `aggregate`."""

    def __init__(self, report: WorkerReport):
        self.report = report

    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "KvbmWorkerMetadata":
        """Merge another rank's report."""
        return KvbmWorkerMetadata(self.report.aggregate(other.report))


class KvbmConnector(KVConnectorBase_V1):
    """vLLM v1 connector for KVBM. One instance per process role: the scheduler (EngineCore process) and
    each worker (one per rank). The API server only uses the class."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        compat.setup_logging()
        self.config = KvbmConfig.from_env(check_paths=False)
        compat.use_recompute_on_load_failure(vllm_config)
        self.geometry = compat.kv_geometry(vllm_config, kv_cache_config)
        self.host_slots = self.config.host_num_blocks(self.geometry.block_bytes)
        self.disk_slots = self.config.disk_num_blocks(self.geometry.block_bytes)
        self.leader: KvbmLeader | None = None
        self.worker: KvbmWorker | None = None
        self.metrics_server = None
        self._hit_sources: dict[str, tuple[int, int, int]] = {}
        self._poll_errors: set[int] = set()
        self._poll_report: WorkerReport | None = None
        self._stats = KvbmStats()
        self.kv_events: KvEvents | None = None  # with --kv-events-config: BlockStored/BlockRemoved per tier
        if not self.host_slots:
            log.warning("kvbm: no CPU cache configured (set DYN_KVBM_CPU_CACHE_GB, e.g. DYN_KVBM_CPU_CACHE_GB=8): "
                        "KVBM passes every request through")
            return
        if role == KVConnectorRole.SCHEDULER:
            note = plugin.startup_note(vllm_config)
            if note is not None:
                log.warning("%s", note)
            self._remote_ok = True
            if self.config.remote_url:
                problem = hash_identity.shared_tier_hash_problem(vllm_config)
                if problem is not None:  # a prefix would never hit across instances: no G4 traffic at all
                    log.warning("%s", problem)
                    self._remote_ok = False
            disk_filter = AdmitAll() if self.config.disable_disk_offload_filter else FrequencyFilter()
            manager = TierManager(self.host_slots, self.disk_slots, disk_filter)
            self.leader = KvbmLeader(manager, self.geometry.block_size, self.geometry.block_bytes,
                                     self.geometry.world_size)
            if KvEvents.enabled(vllm_config):
                manager.events = TierEventLog()
                self.kv_events = KvEvents(manager.events, self.geometry.block_size)
            if self.config.layerwise and compat.device_type(vllm_config) == "cuda":
                from kvbm.mechanism.layerwise import MIN_LAYERWISE_BLOCKS

                self.leader.layerwise_min_blocks = MIN_LAYERWISE_BLOCKS
            if self.config.metrics:
                from kvbm.metrics import serve_metrics

                self.metrics_server = serve_metrics(self.leader, self.config.metrics_host, self.config.metrics_port)
            log.info("kvbm leader: block %d tokens x %d bytes, G2 %d blocks, G3 %d blocks, world size %d",
                     self.geometry.block_size, self.geometry.block_bytes, self.host_slots, self.disk_slots,
                     self.geometry.world_size)
        elif role == KVConnectorRole.WORKER:
            self.worker = KvbmWorker(self.config, rank=compat.tp_rank(), world_size=self.geometry.world_size)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Layer-wise loads and stores run in the attention layers' hooks, which a full CUDA graph replays
        without calling: with KVBM active and DYN_KVBM_LAYERWISE on (the default), vLLM must use PIECEWISE."""
        config = KvbmConfig.from_env(check_paths=False)
        return config.layerwise and config.host_requested

    @property
    def requires_kv_delivery(self) -> bool:
        """A cache is best effort: a dropped store is a future miss, never a reason to recompute."""
        return False

    # ==== scheduler side ========================================================================================

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens KVBM can load beyond vLLM's own prefix hit, and whether they load asynchronously (the request
        waits) or layer by layer in the step that runs it (GPU engines, host hits). No side effects on tiers.
        None: a shared-tier (G4) lookup is in flight; vLLM asks again in a later step."""
        if self.leader is None:
            return 0, False
        n = self.leader.num_matched_tokens(request.request_id, request.block_hashes, num_computed_tokens,
                                           request.num_tokens)  # a resumed request's generated blocks too
        if n is None:
            return None, False
        if n and log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %d tokens in vLLM's cache, %d more in KVBM", request.request_id, num_computed_tokens, n)
        return n, n > 0 and self.leader.load_is_async(request.request_id)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        """Pin the matched blocks and plan their load into the blocks vLLM allocated."""
        if self.leader is None:
            return
        req_id = request.request_id
        if self.kv_events is not None:
            self.kv_events.track(request)
        result = self.leader.on_alloc(req_id, request.block_hashes, blocks.get_block_ids()[0], num_external_tokens)
        if num_external_tokens:
            self._hit_sources[req_id] = (result.host_tokens, result.disk_tokens, result.remote_tokens)

    def get_external_cache_hit_sources(self, request, num_external_tokens: int) -> dict:
        """Split loaded tokens by tier, for vllm:prompt_tokens_cached_by_source."""
        host, disk, remote = self._hit_sources.pop(request.request_id, (0, 0, 0))
        if host + disk + remote != num_external_tokens:
            host = max(0, num_external_tokens - disk - remote)
        return compat.cache_hit_sources(host, disk, remote)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        """Plan stores of the blocks this step completes; hand the step's loads and stores to the workers."""
        if self.leader is None:
            return KvbmConnectorMetadata(StepPlan())
        self.leader.on_preempted(scheduler_output.preempted_req_ids or ())  # before any resumption
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            self.leader.on_scheduled(new.req_id, new.block_ids[0], new.num_computed_tokens + scheduled[new.req_id],
                                     replace=True)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            self.leader.on_scheduled(req_id, new_ids[0] if new_ids else None,
                                     cached.num_computed_tokens[i] + scheduled[req_id],
                                     replace=req_id in cached.resumed_req_ids)
        plan = self.leader.build_step()
        if self.kv_events is not None:
            self.kv_events.snapshot(plan)
        return KvbmConnectorMetadata(plan)

    def update_connector_output(self, connector_output) -> None:
        """Commit or abort the jobs every rank finished."""
        if self.leader is not None:
            meta = connector_output.kv_connector_worker_meta
            self.leader.on_report(meta.report if isinstance(meta, KvbmWorkerMetadata) else None)

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        """Start-up: every worker's geometry must agree with the leader's (a mismatch stops the engine)."""
        if self.leader is not None:
            self.leader.check_handshake({rank: m.handshake for rank, m in metadata.items()
                                         if isinstance(m, KvbmHandshakeMetadata)})
            if (self.leader.remote_fingerprints and self.config.remote_url and self.leader.remote is None
                    and self._remote_ok):
                from kvbm.mechanism.remote.index import RemoteIndex

                secret = self.config.remote_secret.get_secret_value() if self.config.remote_secret else None
                try:
                    self.leader.remote = RemoteIndex.open(self.config.remote_url, self.leader.remote_fingerprints,
                                                          secret)
                except (ValueError, ImportError) as exc:  # the workers already warned about this URL
                    log.debug("kvbm: no shared-tier index: %s", exc)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Hold the request's blocks only while a KVBM store still reads them (never for a load)."""
        self._hit_sources.pop(request.request_id, None)
        if self.kv_events is not None:
            self.kv_events.forget(request.request_id)
        if self.leader is None:
            return False, None
        return self.leader.request_finished(request.request_id), None

    def take_events(self):
        """BlockStored / BlockRemoved for blocks that entered or left G2 (medium CPU) and G3 (STORAGE) since the
        last step; vLLM publishes them with its own when --kv-events-config enables KV cache events."""
        return self.kv_events.take() if self.kv_events is not None else ()

    # ==== worker side ===========================================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Describe vLLM's per-layer caches and allocate this rank's tiers."""
        if self.worker is None:
            return
        first = next(iter(kv_caches.values()))
        layout = KVLayout.from_layers(kv_caches, KVLayout.infer_block_dim(first, self.geometry.num_blocks))
        if layout.block_bytes != self.geometry.block_bytes:
            raise ValueError(f"kvbm: KV caches hold {layout.block_bytes} bytes per block but the KV cache spec says "
                             f"{self.geometry.block_bytes}; this vLLM layout is not supported")
        fingerprint = layout.fingerprint(model=compat.model_identity(self._vllm_config),
                                         block_size=self.geometry.block_size,
                                         extra=f"rank{self.worker.rank}/{self.geometry.world_size}")
        self.worker.register(layout, self.host_slots, self.disk_slots, fingerprint, layer_names=list(kv_caches))

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        """This rank's geometry, checked by the leader at start-up."""
        if self.worker is None or self.worker.engine is None:
            return None
        return KvbmHandshakeMetadata(self.worker.handshake(self.geometry.block_size))

    def _plan(self) -> StepPlan | None:
        if self.worker is None or not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta.plan if isinstance(meta, KvbmConnectorMetadata) else None

    def handle_preemptions(self, kv_connector_metadata) -> None:
        """Blocks of preempted requests are about to be reused: finish the jobs that may still touch them."""
        if self.worker is not None and isinstance(kv_connector_metadata, KvbmConnectorMetadata) \
                and kv_connector_metadata.plan.fences:
            self.worker.fence(kv_connector_metadata.plan)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        """Submit this step's loads (asynchronous ones: their requests wait; layer-wise ones: their requests
        run now) and begin its layer-wise stores."""
        plan = self._plan()
        if plan is not None and not plan.empty:
            self.worker.start_loads(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Layer-wise loads: this layer's attention waits (on the GPU) for its pages; nothing else waits."""
        if self.worker is not None:
            self.worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        """Layer-wise stores: this layer's pages are copied out behind its attention."""
        if self.worker is not None:
            self.worker.save_layer(layer_name)

    def wait_for_save(self) -> None:
        """Submit this step's other stores (asynchronous): the forward has written the blocks they read."""
        plan = self._plan()
        if plan is not None:
            self.worker.start_stores(plan)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose loads finished (receiving) and finished requests whose jobs are all done (sending)."""
        if self.worker is None:
            return None, None
        result = self.worker.poll(finished_req_ids)
        self._poll_errors |= result.failed_block_ids
        if result.report is not None:
            self._stats.aggregate(KvbmStats.from_report(result.report, self.worker.rank))
            self._poll_report = result.report if self._poll_report is None else self._poll_report.aggregate(result.report)
        return result.finished_sending or None, result.finished_recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Engine blocks whose load failed (corrupt, unreadable or evicted): vLLM recomputes them."""
        errors, self._poll_errors = self._poll_errors, set()
        return errors

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        """This step's finished jobs, for the leader."""
        report, self._poll_report = self._poll_report, None
        return KvbmWorkerMetadata(report) if report is not None else None

    def get_kv_connector_stats(self) -> KvbmStats | None:
        """What this worker moved since the last call (vLLM logs and exports it)."""
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, KvbmStats()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvbmStats | None:
        """Rebuild stats from their dict form (API server process)."""
        return KvbmStats(data=data) if data is not None else KvbmStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> KvbmPromMetrics:
        """`vllm:kvbm_*` metrics on vLLM's own /metrics endpoint."""
        return KvbmPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        """Finish in-flight jobs, remove the disk cache file, stop the metrics endpoint."""
        if self.worker is not None:
            self.worker.close()
        if self.leader is not None and self.leader.remote is not None:
            self.leader.remote.close()
            self.leader.remote = None
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None


# Dynamo's class name: the string Dynamo users already pass works unchanged.
DynamoConnector = KvbmConnector
