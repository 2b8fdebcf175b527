"""KVBM's numbers through vLLM's own channels: KVConnectorStats (the "KV Transfer metrics" log line) and
per-connector Prometheus metrics on vLLM's /metrics (`vllm:kvbm_*`, distinct from the DYN_KVBM_METRICS
endpoint's `kvbm_*` names so that scraping both never double-counts).

Operations: KvbmStats.from_report(report, rank) / aggregate / reduce, KvbmPromMetrics.observe
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

DIRECTIONS = ("g1_g2", "g2_g3", "g2_g1", "g3_g1", "g4_g1", "g2_g4")


def _empty() -> dict[str, Any]:
    return {"blocks": {d: 0 for d in DIRECTIONS}, "bytes": {"offload": 0, "onboard": 0}, "load_failures": 0,
            "load_seconds": [], "store_seconds": []}


@dataclass
class KvbmStats(KVConnectorStats):
    """What the workers moved in one interval. Blocks are counted on rank 0 only; bytes on every rank."""

    def __post_init__(self):
        if not self.data:
            self.data = _empty()

    @classmethod
    def from_report(cls, report, rank: int) -> "KvbmStats":
        """Stats of the jobs of one worker report."""
        stats = cls()
        d = stats.data
        for outcome in report.jobs.values():
            kind = "onboard" if any(k in outcome.blocks for k in ("g2_g1", "g3_g1", "g4_g1")) else "offload"
            d["bytes"][kind] += outcome.nbytes
            d[f"{'load' if kind == 'onboard' else 'store'}_seconds"].append(outcome.seconds)
            if rank == 0:
                for direction, n in outcome.blocks.items():
                    d["blocks"][direction] = d["blocks"].get(direction, 0) + n
                d["load_failures"] += len(outcome.failed_block_ids)
        return stats

    def reset(self):
        """Start a new interval."""
        self.data = _empty()

    def aggregate(self, other: KVConnectorStats) -> "KvbmStats":
        """Sum counts, keep every latency sample."""
        d, o = self.data, other.data
        for direction, n in o.get("blocks", {}).items():
            d["blocks"][direction] = d["blocks"].get(direction, 0) + n
        for kind, n in o.get("bytes", {}).items():
            d["bytes"][kind] = d["bytes"].get(kind, 0) + n
        d["load_failures"] += o.get("load_failures", 0)
        d["load_seconds"] += o.get("load_seconds", [])
        d["store_seconds"] += o.get("store_seconds", [])
        return self

    def reduce(self) -> dict[str, int | float]:
        """One line's worth: blocks per direction, GB moved, mean job latency."""
        d = self.data
        out: dict[str, int | float] = {f"blocks_{k}": v for k, v in d["blocks"].items()}
        out["offload_GB"] = round(d["bytes"]["offload"] / 1e9, 4)
        out["onboard_GB"] = round(d["bytes"]["onboard"] / 1e9, 4)
        out["load_failures"] = d["load_failures"]
        for kind in ("load", "store"):
            xs = d[f"{kind}_seconds"]
            out[f"avg_{kind}_ms"] = round(1e3 * sum(xs) / len(xs), 3) if xs else 0.0
        return out

    def is_empty(self) -> bool:
        """True when nothing moved."""
        d = self.data
        return not any(d["blocks"].values()) and not any(d["bytes"].values()) and not d["load_failures"]


class KvbmPromMetrics(KVConnectorPromMetrics):
    """`vllm:kvbm_*` metrics on vLLM's /metrics, per engine. Lives in the API server process."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._blocks = self._counter_cls(name="vllm:kvbm_transfer_blocks", documentation=
                                         "KV blocks moved by KVBM, by direction (g1_g2, g2_g3, g2_g1, g3_g1, g4_g1, g2_g4)",
                                         labelnames=labelnames + ["direction"])
        self._bytes = self._counter_cls(name="vllm:kvbm_transfer_bytes", documentation=
                                        "Bytes moved by KVBM (all ranks)", labelnames=labelnames + ["kind"])
        self._failures = self._counter_cls(name="vllm:kvbm_load_failures", documentation=
                                           "KVBM blocks whose load failed and were recomputed", labelnames=labelnames)
        self._latency = self._histogram_cls(name="vllm:kvbm_job_seconds", documentation="KVBM job latency",
                                            labelnames=labelnames + ["kind"],
                                            buckets=[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0])

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        """Record one stats update from the engine."""
        labels = self.per_engine_labelvalues[engine_idx]
        for direction, n in transfer_stats_data.get("blocks", {}).items():
            if n:
                self._blocks.labels(*labels, direction).inc(n)
        for kind, n in transfer_stats_data.get("bytes", {}).items():
            if n:
                self._bytes.labels(*labels, kind).inc(n)
        if transfer_stats_data.get("load_failures"):
            self._failures.labels(*labels).inc(transfer_stats_data["load_failures"])
        for kind in ("load", "store"):
            for seconds in transfer_stats_data.get(f"{kind}_seconds", []):
                self._latency.labels(*labels, kind).observe(seconds)
