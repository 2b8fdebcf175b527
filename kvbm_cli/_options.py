"""The options every command shares, defined once, the choices as enums, and the one way to make a group.

Operations:
  group(help, ...)     a Typer group with kvbm's settings: plain help that never cuts a flag's name (80 columns,
                       pipes), -h/--help, no rich error panels
  JsonOpt, ModelOpt, UrlOpt, TokenizerOpt, OutDirOpt, ...   Annotated options (same name and help everywhere)
  Connector, Driver, Endpoint, PrefixOrder, DiskIO          the choices, shown in --help
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def group(help: str, **kwargs) -> typer.Typer:
    """A command group; rich_markup_mode=None: click's own help, which wraps text but never cuts option names."""
    return typer.Typer(help=help, no_args_is_help=kwargs.pop("no_args_is_help", True), rich_markup_mode=None,
                       pretty_exceptions_enable=False, context_settings=CONTEXT, **kwargs)


def _choices(name: str, *values: str) -> type[Enum]:
    """A str Enum of `values` (a member's name has '_' for '-'); Typer shows its values in --help."""
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str, module=__name__)


Connector = _choices("Connector", "kvbm", "none")  # kvbm: vLLM + KVBM (Dynamo's DynamoConnector); none: baseline
Driver = _choices("Driver", "native", "aiperf", "genai-perf")  # the native async client, or a tool's export imported
Endpoint = _choices("Endpoint", "chat", "completions")
PrefixOrder = _choices("PrefixOrder", "random", "round-robin")
DiskIO = _choices("DiskIO", "posix", "nixl")


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for tools instead of tables.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model id, local directory or config.json (kvbm size also knows built-ins such as "
    "Qwen/Qwen3-4B; a client: the served name to request). Default: the embedded tiny model, served as kvbm-tiny "
    "(a client: the server's first model).")]
UrlOpt = Annotated[str, typer.Option("--url", "-u", help="Base URL of the OpenAI-compatible server.")]
TokenizerOpt = Annotated[Optional[str], typer.Option(
    "--tokenizer", help="Tokenizer (model dir or cached model id) for exact prompt lengths. Default: the "
    "server's model.")]
ArtifactOpt = Annotated[Optional[Path], typer.Option(
    "--artifact-dir", help="Where requests.jsonl and summary.json go. Default: runs/<workload>.", file_okay=False)]
RunOpt = Annotated[Optional[str], typer.Option("--run", help="Run label stored in the results. Default: the "
                                                              "artifact dir's name.")]
DriverOpt = Annotated[Driver, typer.Option("--driver", help="native (built-in async client), aiperf or genai-perf "
                                                            "(run that tool and import its export).")]
TimeoutOpt = Annotated[float, typer.Option("--request-timeout", help="Seconds one request may take.")]
PortOpt = Annotated[int, typer.Option("--port", help="Engine HTTP port.")]
HealthTimeoutOpt = Annotated[float, typer.Option("--health-timeout", help="Seconds an engine may take to become "
                                                                          "healthy.")]
NBootOpt = Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples for the intervals.", min=100)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (same inputs, same result).")]
BlockSizeOpt = Annotated[Optional[int], typer.Option("--block-size", help="Tokens per KV block (vLLM's CPU build: "
                                                                          "a multiple of 32, default 128).")]
StoreUrlOpt = Annotated[Optional[str], typer.Option("--url", envvar="DYN_KVBM_REMOTE_URL", show_envvar=False, help=(
    "Shared-tier store (default: DYN_KVBM_REMOTE_URL): redis://[user:pass@]host:port/db, rediss://, file:///dir."))]
MetricsUrlsOpt = Annotated[Optional[list[str]], typer.Option(
    "--url", "-u", help="A /metrics URL or host:port, repeatable. Default: vLLM on 127.0.0.1:8000 and KVBM on "
    "127.0.0.1:$DYN_KVBM_METRICS_PORT (6880).")]
