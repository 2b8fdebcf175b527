"""`kvbm bench` workloads: transfer, ttft, prefix-reuse, multi-round, compare, soak (kvbm_cli/commands/bench.py
registers their commands).

Modules: prompts (exact-length prompts), client (async streaming client), common (running a workload into result
files, the summary), prefix_reuse, multi_round, soak, drivers (aiperf / genai-perf), compare (engines x workload
from a scenario), transfer, ttft.
"""
