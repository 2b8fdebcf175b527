"""KVBM's Prometheus metrics, served by the leader (vLLM's scheduler process) on DYN_KVBM_METRICS_PORT.

Values are read from the leader's counters at scrape time: the serving path pays nothing for metrics.
Dynamo KVBM's metric names are exported exactly as Dynamo names them (counters without a _total suffix),
so existing dashboards work; kvbm's own metrics follow Prometheus conventions.

Operations: KvbmCollector(leader).collect(), serve_metrics(leader, host, port) -> server with shutdown()
"""

from __future__ import annotations

import logging
import statistics

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("kvbm.metrics")

# Dynamo-compatible counters: (name, help, value getter)
_DYNAMO_COUNTERS = (
    ("kvbm_matched_tokens", "Tokens matched in KVBM's tiers and loaded", lambda l, p: l.stats.matched_tokens),
    ("kvbm_offload_blocks_d2h", "Blocks offloaded from device (G1) to host (G2)", lambda l, p: p.offloaded_to_host),
    ("kvbm_offload_blocks_h2d", "Blocks offloaded from host (G2) to disk (G3)", lambda l, p: p.offloaded_to_disk),
    ("kvbm_offload_blocks_d2d", "Blocks offloaded from device (G1) straight to disk (G3)", lambda l, p: 0),
    ("kvbm_onboard_blocks_h2d", "Blocks onboarded from host (G2) to device (G1)", lambda l, p: p.onboarded_from_host),
    ("kvbm_onboard_blocks_d2d", "Blocks onboarded from disk (G3) to device (G1)", lambda l, p: p.onboarded_from_disk),
    ("kvbm_disk_bytes_read", "Bytes read from the disk tier", lambda l, p: l.stats.disk_bytes_read),
    ("kvbm_disk_bytes_written", "Bytes written to the disk tier", lambda l, p: l.stats.disk_bytes_written),
    ("kvbm_cache_evictions", "Blocks evicted from host or disk without a lower tier to keep them",
     lambda l, p: p.dropped_by_filter + p.dropped_no_disk + p.evicted_from_disk),
    # the shared tier (G4), in Dynamo's naming style: h2r = host -> remote, r2d = remote -> device (through host)
    ("kvbm_offload_blocks_h2r", "Blocks written from host (G2) to the shared tier (G4)", lambda l, p: p.offloaded_to_remote),
    ("kvbm_onboard_blocks_r2d", "Blocks onboarded from the shared tier (G4) to device (G1), staged through host",
     lambda l, p: p.onboarded_from_remote),
    ("kvbm_remote_bytes_read", "Bytes read from the shared tier (G4)", lambda l, p: l.stats.remote_bytes_read),
    ("kvbm_remote_bytes_written", "Bytes written to the shared tier (G4)", lambda l, p: l.stats.remote_bytes_written),
)


def _exact_counter(name: str, doc: str, value: float) -> Metric:
    metric = Metric(name, doc, "unknown")  # "counter" would force a _total suffix on the name
    metric.add_sample(name, {}, value)
    return metric


class KvbmCollector:
    """Prometheus collector over one leader's counters. Lives in the scheduler process."""

    def __init__(self, leader):
        self.leader = leader

    def _hit_rates(self) -> tuple[float, float, float]:
        window = list(self.leader.stats.window)
        looked = sum(w[0] for w in window)
        if not looked:
            return 0.0, 0.0, 0.0
        return tuple(sum(w[i] for w in window) / looked for i in (1, 2, 3))

    def collect(self):
        """Yield every metric family (called by prometheus_client on each scrape)."""
        leader, policy = self.leader, self.leader.manager.stats
        for name, doc, get in _DYNAMO_COUNTERS:
            yield _exact_counter(name, doc, get(leader, policy))
        host_rate, disk_rate, remote_rate = self._hit_rates()
        yield GaugeMetricFamily("kvbm_host_cache_hit_rate", "Share of looked-up blocks found in host memory "
                                "(last 256 admissions)", value=host_rate)
        yield GaugeMetricFamily("kvbm_disk_cache_hit_rate", "Share of looked-up blocks found on disk "
                                "(last 256 admissions)", value=disk_rate)
        yield GaugeMetricFamily("kvbm_remote_cache_hit_rate", "Share of looked-up blocks found in the shared tier "
                                "(G4) (last 256 admissions)", value=remote_rate)
        yield CounterMetricFamily("kvbm_offload_bytes", "Bytes offloaded device -> host", value=leader.stats.offload_bytes)
        yield CounterMetricFamily("kvbm_onboard_bytes", "Bytes onboarded host/disk -> device", value=leader.stats.onboard_bytes)
        yield CounterMetricFamily("kvbm_load_failures", "Blocks whose load failed (recomputed), shared tier included",
                                  value=policy.onboard_failed + policy.remote_load_failed)
        stats = leader.stats
        yield CounterMetricFamily("kvbm_aborted_loads", "Requests finished (e.g. client disconnects) while their "
                                  "onboard was in flight; the load is dropped", value=stats.aborted_loads)
        yield CounterMetricFamily("kvbm_delayed_frees", "Finished requests whose blocks vLLM held until their "
                                  "stores finished", value=stats.delayed_frees)
        yield CounterMetricFamily("kvbm_preemptions", "Preempted requests KVBM fenced", value=stats.preemptions)
        yield CounterMetricFamily("kvbm_fenced_jobs", "Jobs a preemption waited for", value=stats.fenced_jobs)
        states = GaugeMetricFamily("kvbm_requests", "Requests KVBM tracks, by lifecycle state", labels=["state"])
        for state, n in leader.states().items():
            states.add_metric([state], n)
        yield states
        yield GaugeMetricFamily("kvbm_jobs_in_flight", "Transfer jobs not yet reported by every rank",
                                value=leader.jobs_in_flight)
        yield GaugeMetricFamily("kvbm_disk_tier_up", "1 while the disk tier (G3) is in use",
                                value=float(leader.manager.disk is not None))
        yield from self._remote(leader, policy)
        skipped = CounterMetricFamily("kvbm_offload_skipped_blocks", "Blocks not offloaded", labels=["reason"])
        skipped.add_metric(["host_full"], policy.skipped_full)
        skipped.add_metric(["disk_filter"], policy.dropped_by_filter)
        yield skipped
        usage = GaugeMetricFamily("kvbm_tier_usage_blocks", "Blocks held per tier", labels=["tier"])
        capacity = GaugeMetricFamily("kvbm_tier_capacity_blocks", "Slots per tier", labels=["tier"])
        for tier, (held, slots) in leader.manager.usage().items():
            usage.add_metric([tier.label], held)
            capacity.add_metric([tier.label], slots)
        yield usage
        yield capacity
        latency = GaugeMetricFamily("kvbm_transfer_seconds", "Job latency quantiles over the last 1024 jobs",
                                    labels=["kind", "quantile"])
        samples = list(leader.stats.transfer_seconds)
        for kind in ("load", "store"):
            values = sorted(s for k, s in samples if k == kind)
            if len(values) >= 2:
                cuts = statistics.quantiles(values, n=100, method="inclusive")
                for q, idx in (("0.5", 49), ("0.9", 89), ("0.99", 98)):
                    latency.add_metric([kind, q], cuts[idx])
        yield latency


    @staticmethod
    def _remote(leader, policy):
        """The shared tier (G4): lookups, hits, failures, whether the store answers."""
        stats = leader.stats
        yield CounterMetricFamily("kvbm_remote_lookups", "Shared-tier (G4) lookups sent (one batch per request)",
                                  value=stats.remote_lookups)
        yield CounterMetricFamily("kvbm_remote_lookup_blocks", "Blocks asked of the shared tier (G4)",
                                  value=stats.remote_lookup_blocks)
        yield CounterMetricFamily("kvbm_remote_lookup_hits", "Blocks the shared tier (G4) held when asked "
                                  "(leading runs)", value=stats.remote_lookup_hits)
        failures = CounterMetricFamily("kvbm_remote_failures", "Shared-tier (G4) blocks lost, by reason: a load "
                                       "that found the block missing, evicted, corrupt or with a bad MAC "
                                       "(recomputed), a write the store refused, a lookup not answered in time, "
                                       "a hit with no host slot to stage it through", labels=["reason"])
        failures.add_metric(["load"], policy.remote_load_failed)
        failures.add_metric(["store"], policy.remote_offload_failed)
        failures.add_metric(["lookup_timeout"], stats.remote_lookup_timeouts)
        failures.add_metric(["staging_full"], policy.remote_staging_full)
        yield failures
        remote = leader.remote
        yield GaugeMetricFamily("kvbm_remote_tier_up", "1 while the shared tier (G4) is configured and answers",
                                value=float(remote is not None and all(s.reachable for s in remote.stores)))


def serve_metrics(leader, host: str, port: int):
    """Serve the leader's metrics on http://host:port/metrics; returns the server (None when the port is taken)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KvbmCollector(leader))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.warning("kvbm: metrics endpoint not started on %s:%d (%s); set DYN_KVBM_METRICS_PORT to a free port",
                    host, port, exc.strerror or exc)
        return None
    log.info("kvbm metrics on http://%s:%d/metrics", host, port)
    return server
