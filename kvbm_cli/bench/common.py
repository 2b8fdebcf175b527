"""What the workloads share: one typed base whose fields are both the command's flags and the scenario's keys,
one way to run a workload into result files, one way to make its command.

Operations:
  Keys, WorkloadConfig     a scenario block (keys spelled as the flags, unknown refused); a workload's options
                           (fields with their help) and how it sends requests (`drive`)
  run_workload(cfg, ...)   native client or aiperf -> requests.jsonl + summary.json (model and tokenizer from
                           the server when not given)
  flags(cls)               a command with one option per field of `cls` besides its own
  workload_command(cls)    `kvbm bench <workload>`: client options + the workload's fields; summary on stdout
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Optional

import typer
from pydantic import ConfigDict, ValidationError

from kvbm_cli._errors import CheckFailed, CliError, flag_error
from kvbm_cli._keys import Keys
from kvbm_cli._options import ArtifactOpt, Driver, DriverOpt, JsonOpt, ModelOpt, RunOpt, TimeoutOpt, TokenizerOpt, UrlOpt
from kvbm_cli._output import emit_json, note, out, table
from kvbm_cli.bench.client import Target
from kvbm_cli.httpclient import server_model
from kvbm_cli.results import Summary, iso_now, summarize, write_run


class WorkloadConfig(Keys):
    """A workload's options: each field is a flag of its command (the description is its help) and a key of a
    scenario's `workload:` block. A subclass names the workload and sends its requests in `drive`."""

    model_config = ConfigDict(use_enum_values=True)
    name: ClassVar[str]
    drivers: ClassVar[tuple[str, ...]] = ("native",)

    async def drive(self, tok: Any, target: Target) -> Optional[dict[str, int]]:
        """Send the requests with the native client; the prompt length each should have (or None)."""
        raise NotImplementedError


def run_workload(cfg: WorkloadConfig, *, url: str, model: Optional[str], tokenizer: Optional[str],
                 artifact_dir: Path, run: str, engine: Optional[dict[str, Any]] = None, timeout_s: float = 600.0,
                 show_progress: bool = True, driver: str = "native") -> Summary:
    """Run `cfg` against `url` (the native client runs `cfg.drive`, aiperf its own) and write requests.jsonl
    (sorted by start) + summary.json under `artifact_dir`; warn when the server counted other prompt lengths."""
    from kvbm_cli.bench import drivers
    from kvbm_cli.bench.prompts import PromptTokenizer

    cfg.validate()
    if driver not in cfg.drivers:
        raise CliError(f"kvbm bench {cfg.name} runs with the native client only (--driver native): aiperf and "
                       "genai-perf have no such workload")
    if driver != "native":
        drivers.find_tool(driver)  # fail before contacting the server
    served, root = server_model(url.split(",")[0])  # root: what the server loaded (the tiny model's directory)
    model = model or served
    tok_source = tokenizer or model
    if tokenizer is None and not Path(tok_source).expanduser().exists() and Path(root).exists():
        tok_source = root
    config = cfg.model_dump() | {"tokenizer": tok_source}
    started_at = iso_now()
    expected: dict[str, int] = {}
    if driver != "native":
        records, command = drivers.run_external(driver, cfg, url=url, model=model, tokenizer=tok_source,
                                                artifact_dir=artifact_dir, run=run)
        config |= {"driver_command": command}
    else:
        target = Target(url, model, run, cfg.name, artifact_dir, timeout_s, show_progress)
        expected = asyncio.run(cfg.drive(PromptTokenizer(tok_source), target)) or {}
        records = target.records
    records = sorted(records, key=lambda r: r.start_s)
    summary = summarize(records, run=run, workload=cfg.name, url=url, model=model, driver=driver,
                        started_at=started_at, config=config, engine=engine)
    write_run(artifact_dir, records, summary)
    off = [r for r in records if r.error is None and r.input_tokens != expected.get(r.request_id, r.input_tokens)]
    if off:
        note(f"warning: {len(off)} prompts were not the requested length in the server's tokens (e.g. "
             f"{off[0].request_id}: {off[0].input_tokens} instead of {expected[off[0].request_id]}); is "
             "--tokenizer the server's tokenizer?")
    if summary.num_errors:
        first = next(r.error for r in records if r.error and not r.warmup)
        if summary.num_errors == summary.num_requests:
            raise CheckFailed(f"all {summary.num_requests} requests failed (results in {artifact_dir}); first: {first}")
        note(f"warning: {summary.num_errors} of {summary.num_requests} requests failed; first: {first}")
    return summary


def flags(cls: type[Keys]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate `command(cfg, **own_options)`: the Typer command gets one option per field of `cls` (--field-name,
    the field's description as help) before its own, and `command` gets the checked `cls` built from them."""
    def option(name: str, field: Any) -> inspect.Parameter:
        flag = "--" + name.replace("_", "-")
        decl = f"{flag}/--no-{flag[2:]}" if field.annotation is bool else flag
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                                 annotation=Annotated[field.annotation, typer.Option(decl, help=field.description)])

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(command)
        def wrapper(**options: Any) -> None:
            try:
                cfg = cls(**{name: options.pop(name) for name in cls.model_fields})
            except ValidationError as exc:
                raise flag_error(exc) from None
            cfg.validate()
            command(cfg, **options)

        own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]
        fields = [option(name, field) for name, field in cls.model_fields.items()]
        wrapper.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                                                   for p in fields + own])
        return wrapper
    return decorate


def workload_command(cls: type[WorkloadConfig]) -> Callable[..., None]:
    """`kvbm bench <workload>`: run `cls` against a server (results in --artifact-dir), the summary on stdout."""
    @flags(cls)
    def command(cfg: WorkloadConfig, url: UrlOpt = "http://localhost:8000", model: ModelOpt = None,
                tokenizer: TokenizerOpt = None, artifact_dir: ArtifactOpt = None, run: RunOpt = None,
                driver: DriverOpt = Driver.native, request_timeout: TimeoutOpt = 600.0,
                json_out: JsonOpt = False) -> None:
        artifact_dir = artifact_dir or Path("runs") / cfg.name
        summary = run_workload(cfg, url=url, model=model, tokenizer=tokenizer, artifact_dir=artifact_dir,
                               run=run or artifact_dir.name, timeout_s=request_timeout, show_progress=not json_out,
                               driver=Driver(driver).value)
        if json_out:
            emit_json(summary.model_dump(mode="json"))
            return
        columns = ("mean", "p50", "p90", "p99", "min", "max")
        stats = {"TTFT ms": summary.ttft_s, "ITL ms": summary.itl_s, "E2E ms": summary.e2e_s}
        out().print(table(f"{summary.workload} · {summary.run} · {summary.num_requests} requests, {summary.num_errors} "
                          f"errors, {summary.duration_s:.1f} s", ["metric", *(c + ">" for c in columns)],
                          [(name, *("-" if getattr(s, c) is None else f"{getattr(s, c) * 1000:.1f}" for c in columns))
                           for name, s in stats.items()]))
        out().print(f"output {summary.output_tokens_per_s:.1f} tok/s · input {summary.input_tokens_per_s:.1f} "
                    f"tok/s · {summary.requests_per_s:.2f} req/s · results in {artifact_dir}",
                    markup=False, soft_wrap=True)

    command.__doc__ = cls.__doc__
    return command
