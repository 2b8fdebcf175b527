"""Moved to kvbm_cli.bench.ttft; this alias keeps `from kvbm_cli.bench_ttft import first_token_seconds` working."""

from kvbm_cli.bench.ttft import first_token_seconds  # noqa: F401
