"""`kvbm bench` workloads: prefix-reuse, multi-round, compare (transfer lives in kvbm_cli.bench_transfer).

Modules: prompts (exact-length prompts), client (async streaming client), common (options, result files),
prefix_reuse, multi_round, drivers (aiperf / genai-perf), compare (engines x workload from a scenario).
Importing this package registers the commands on `bench_app`.
"""

from kvbm_cli.bench import compare, multi_round, prefix_reuse, soak  # noqa: F401
