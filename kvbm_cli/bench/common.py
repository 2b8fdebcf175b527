"""What the workload commands share: options, model and tokenizer resolution, result files, the summary table.

Operations:
  resolve_model_and_tokenizer(url, model, tokenizer)   model id from the server when not given; tokenizer dir
  ArtifactWriter(dir)                                   requests.jsonl appended as requests finish
  finish_run(...)                                       summary.json written; warnings on token-count mismatches
  print_summary(summary, json_out)                      a table (or JSON) on stdout
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from kvbm_cli._output import err, out
from kvbm_cli._errors import CheckFailed, CliError
from kvbm_cli._options import Driver
from kvbm_cli.httpclient import server_model
from kvbm_cli.results import REQUESTS_FILE, SUMMARY_FILE, RequestRecord, Summary, summarize, write_requests, write_summary

class Keys(BaseModel):
    """A typed block of a scenario file: keys spelled as the flags (kebab-case), unknown keys refused."""

    model_config = ConfigDict(extra="forbid", alias_generator=lambda name: name.replace("_", "-"),
                              populate_by_name=True)


def resolve_model_and_tokenizer(url: str, model: Optional[str], tokenizer: Optional[str]) -> tuple[str, str]:
    """(model name to send, tokenizer source)."""
    served, root = server_model(url)  # root: what the server loaded (the tiny model's directory for kvbm-tiny)
    model = model or served
    source = tokenizer or model
    if tokenizer is None and not Path(source).expanduser().exists() and Path(root).exists():
        source = root
    return model, source


class ArtifactWriter:
    """Collects records and appends each to requests.jsonl as it finishes (a dying run keeps its data)."""

    def __init__(self, artifact_dir: Path):
        self.dir = artifact_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / REQUESTS_FILE
        self.path.write_text("")
        self.records: list[RequestRecord] = []

    def add(self, record: RequestRecord) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(record.model_dump_json() + "\n")


def finish_run(records: list[RequestRecord], artifact_dir: Path, *, run: str, workload: str, url: str, model: str,
               driver: str, started_at: str, config: dict[str, Any],
               engine: Optional[dict[str, Any]], expected: Optional[dict[str, int]] = None) -> Summary:
    """Write both files (requests sorted by start; the duration is the measured requests' first start to last
    finish) and warn when the server counted other prompt lengths."""
    records = sorted(records, key=lambda r: r.start_s)
    write_requests(artifact_dir / REQUESTS_FILE, records)
    summary = summarize(records, run=run, workload=workload, url=url, model=model, driver=driver,
                        started_at=started_at, config=config, engine=engine)
    write_summary(artifact_dir / SUMMARY_FILE, summary)
    if expected:
        off = [r for r in records if r.error is None and r.request_id in expected
               and r.input_tokens != expected[r.request_id]]
        if off:
            r = off[0]
            err().print(f"warning: {len(off)} prompts were not the requested length in the server's tokens "
                        f"(e.g. {r.request_id}: {r.input_tokens} instead of {expected[r.request_id]}); is "
                        "--tokenizer the server's tokenizer?", markup=False)
    if summary.num_errors and summary.num_errors == summary.num_requests:
        first = next(r.error for r in records if r.error and not r.warmup)
        raise CheckFailed(f"all {summary.num_requests} requests failed (results in {artifact_dir}); first: {first}")
    if summary.num_errors:
        first = next(r.error for r in records if r.error and not r.warmup)
        err().print(f"warning: {summary.num_errors} of {summary.num_requests} requests failed; first: {first}",
                    markup=False)
    return summary


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def print_summary(summary: Summary, artifact_dir: Path, json_out: bool) -> None:
    """The summary as a table on stdout, or as JSON with --json."""
    if json_out:
        out().print_json(json.dumps(summary.model_dump(mode="json")))
        return
    from rich.table import Table

    table = Table(title=f"{summary.workload} · {summary.run} · {summary.num_requests} requests, "
                        f"{summary.num_errors} errors, {summary.duration_s:.1f} s")
    table.add_column("metric")
    for col in ("mean", "p50", "p90", "p99", "min", "max"):
        table.add_column(col, justify="right")
    for name, stats in (("TTFT ms", summary.ttft_s), ("ITL ms", summary.itl_s), ("E2E ms", summary.e2e_s)):
        d = stats.model_dump()
        table.add_row(name, *(_ms(d[c]) for c in ("mean", "p50", "p90", "p99", "min", "max")))
    console = out()
    console.print(table)
    console.print(f"output {summary.output_tokens_per_s:.1f} tok/s · input {summary.input_tokens_per_s:.1f} tok/s · "
                  f"{summary.requests_per_s:.2f} req/s · results in {artifact_dir}", markup=False, soft_wrap=True)


def check_driver(driver: str) -> None:
    """A CliError unless `driver` is one of the Driver choices."""
    if driver not in {d.value for d in Driver}:
        raise CliError(f"--driver must be native, aiperf or genai-perf, not {driver!r}")
