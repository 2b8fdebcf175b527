"""What the workloads share: model and tokenizer resolution, one way to run a workload into result files, and
one way for its command to run it and show the summary.

Operations:
  Keys                                                  a scenario block: keys spelled as the flags, unknown refused
  resolve_model_and_tokenizer(url, model, tokenizer)   model id from the server when not given; tokenizer dir
  ArtifactWriter(dir)                                   requests.jsonl appended as requests finish
  run_workload(cfg, workload, drive, ...)               native client (drive) or aiperf / genai-perf -> the files
  finish_run(...)                                       summary.json written; warnings on token-count mismatches
  run_command(run, cfg, workload, ...)                  a workload command: artifact dir, run, summary on stdout
  print_summary(summary, json_out)                      a table (or JSON) on stdout
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from kvbm_cli._errors import CheckFailed
from kvbm_cli._output import emit_json, note, out, table
from kvbm_cli.httpclient import server_model
from kvbm_cli.results import (REQUESTS_FILE, SUMMARY_FILE, RequestRecord, Summary, append_request, iso_now, summarize,
                              write_requests, write_summary)

class Keys(BaseModel):
    """A typed block of a scenario file: keys spelled as the flags (kebab-case), unknown keys refused."""

    model_config = ConfigDict(extra="forbid", alias_generator=lambda name: name.replace("_", "-"),
                              populate_by_name=True)


def resolve_model_and_tokenizer(url: str, model: Optional[str], tokenizer: Optional[str]) -> tuple[str, str]:
    """(model name to send, tokenizer source)."""
    served, root = server_model(url.split(",")[0])  # root: what the server loaded (the tiny model's directory for kvbm-tiny)
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
        append_request(self.path, record)


Drive = Callable[[str, Any, ArtifactWriter], Awaitable[Optional[dict[str, int]]]]


def run_workload(cfg: BaseModel, workload: str, drive: Drive, *, url: str, model: Optional[str],
                 tokenizer: Optional[str], artifact_dir: Path, run: str, engine: Optional[dict[str, Any]],
                 driver: str = "native") -> Summary:
    """Run a workload against `url` and write requests.jsonl + summary.json under `artifact_dir`.

    The native client runs `drive(model, tokenizer, writer)`, which returns the prompt length each request
    should have (or None); `driver` aiperf or genai-perf runs that tool instead (kvbm_cli.bench.drivers).
    """
    from kvbm_cli.bench.prompts import PromptTokenizer

    model, tok_source = resolve_model_and_tokenizer(url, model, tokenizer)
    config = cfg.model_dump() | {"tokenizer": tok_source}
    if driver != "native":
        from kvbm_cli.bench import drivers

        return drivers.run_external(driver, workload, cfg, url=url, model=model, tokenizer=tok_source,
                                    artifact_dir=artifact_dir, run=run, engine=engine, config=config)
    tok = PromptTokenizer(tok_source)
    writer = ArtifactWriter(artifact_dir)
    started_at = iso_now()
    expected = asyncio.run(drive(model, tok, writer))
    return finish_run(writer.records, artifact_dir, run=run, workload=workload, url=url, model=model, driver=driver,
                      started_at=started_at, config=config, engine=engine, expected=expected)


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
            note(f"warning: {len(off)} prompts were not the requested length in the server's tokens "
                 f"(e.g. {r.request_id}: {r.input_tokens} instead of {expected[r.request_id]}); is "
                 "--tokenizer the server's tokenizer?")
    if summary.num_errors and summary.num_errors == summary.num_requests:
        first = next(r.error for r in records if r.error and not r.warmup)
        raise CheckFailed(f"all {summary.num_requests} requests failed (results in {artifact_dir}); first: {first}")
    if summary.num_errors:
        first = next(r.error for r in records if r.error and not r.warmup)
        note(f"warning: {summary.num_errors} of {summary.num_requests} requests failed; first: {first}")
    return summary


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def run_command(run_fn: Callable[..., Summary], cfg: BaseModel, workload: str, *, artifact_dir: Optional[Path],
                run: Optional[str], json_out: bool, **kwargs: Any) -> None:
    """What a workload command does once its options are parsed: run it (results in `artifact_dir`, default
    runs/<workload>), then the summary on stdout."""
    artifact_dir = artifact_dir or Path("runs") / workload
    summary = run_fn(cfg, artifact_dir=artifact_dir, run=run or artifact_dir.name, show_progress=not json_out,
                     **kwargs)
    print_summary(summary, artifact_dir, json_out)


def print_summary(summary: Summary, artifact_dir: Path, json_out: bool) -> None:
    """The summary as a table on stdout, or as JSON with --json."""
    if json_out:
        emit_json(summary.model_dump(mode="json"))
        return
    columns = ("mean", "p50", "p90", "p99", "min", "max")
    rows = table(f"{summary.workload} · {summary.run} · {summary.num_requests} requests, {summary.num_errors} errors, "
                 f"{summary.duration_s:.1f} s", ["metric", *(c + ">" for c in columns)])
    for name, stats in (("TTFT ms", summary.ttft_s), ("ITL ms", summary.itl_s), ("E2E ms", summary.e2e_s)):
        rows.add_row(name, *(_ms(getattr(stats, c)) for c in columns))
    console = out()
    console.print(rows)
    console.print(f"output {summary.output_tokens_per_s:.1f} tok/s · input {summary.input_tokens_per_s:.1f} tok/s · "
                  f"{summary.requests_per_s:.2f} req/s · results in {artifact_dir}", markup=False, soft_wrap=True)
