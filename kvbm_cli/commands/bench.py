"""`kvbm bench`: the workload commands, each defined beside its workload in kvbm_cli/bench/ (options -> run_* ->
the summary), registered here as one group."""

from __future__ import annotations

from kvbm_cli._options import group
from kvbm_cli.bench import compare, hit_rate, multi_round, prefix_reuse, soak, transfer, ttft

bench_app = group("Drive workloads and measure: transfer throughput, TTFT, prefix reuse, multi-round QA, hit rate, soak.")
for name, command in (("transfer", transfer.transfer), ("ttft", ttft.ttft), ("prefix-reuse", prefix_reuse.prefix_reuse),
                      ("multi-round", multi_round.multi_round), ("hit-rate", hit_rate.hit_rate), ("compare", compare.compare),
                      ("soak", soak.soak)):
    bench_app.command(name)(command)
