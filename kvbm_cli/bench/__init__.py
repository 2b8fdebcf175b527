"""`kvbm bench` workloads, one module each (kvbm_cli/commands/bench.py registers their commands), and what they
share: prompts (exact-length prompts), client (async streaming client), common (runs into result files)."""
