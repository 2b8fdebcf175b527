"""`kvbm bench`: the workload commands, each defined beside its workload in kvbm_cli/bench/ (options -> run_* ->
the summary), registered here as one group."""

from __future__ import annotations

from kvbm_cli._options import group
from kvbm_cli.bench import common, compare, hit_rate, multi_round, prefix_reuse, soak, transfer, ttft

bench_app = group("Drive workloads and measure: transfer throughput, TTFT, prefix reuse, multi-round QA, hit rate, soak.")
workloads = (prefix_reuse.PrefixReuseConfig, multi_round.MultiRoundConfig, hit_rate.HitRateConfig)
for name, command in (("transfer", transfer.transfer), ("ttft", ttft.ttft),
                      *((w.name, common.workload_command(w)) for w in workloads),  # options from its fields
                      ("compare", compare.compare), ("soak", soak.soak)):
    bench_app.command(name)(command)
