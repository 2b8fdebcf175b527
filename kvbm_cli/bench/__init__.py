"""`kvbm bench` workloads: transfer, ttft, prefix-reuse, multi-round, compare, soak (app.py registers them).

Modules: prompts (exact-length prompts), client (async streaming client), common (result files), prefix_reuse,
multi_round, soak, drivers (aiperf / genai-perf), compare (engines x workload from a scenario), transfer, ttft.
"""
