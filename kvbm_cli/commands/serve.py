"""`kvbm serve`: vLLM's OpenAI server with or without the KVBM connector (kvbm_cli.engine launches it), with
the flags of `python -m dynamo.vllm`; the log streams to stderr or a file until Ctrl+C or SIGTERM."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError

from kvbm_cli._errors import EXIT_INTERRUPTED, flag_error
from kvbm_cli._options import BlockSizeOpt, Connector, HealthTimeoutOpt, JsonOpt, ModelOpt, PortOpt
from kvbm_cli._output import emit_json, note, out
from kvbm_cli.engine import Engine, EngineFailed, EngineSpec, build_launch, shown, sigterm_as_exception, start_and_wait


def serve(
    ctx: typer.Context,
    model: ModelOpt = None,
    connector: Annotated[Connector, typer.Option(help="kvbm: vLLM + KVBM (Dynamo's DynamoConnector); none: baseline.")] = Connector.none,
    port: PortOpt = 8000,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (vLLM's default: all).")] = None,
    gpu_memory_utilization: Annotated[Optional[float], typer.Option(
        help="GPU: fraction of GPU memory vLLM may use (weights + G1). No effect on the CPU build.")] = None,
    kv_cache_memory_bytes: Annotated[Optional[int], typer.Option(
        help="G1 size in bytes (GPU and CPU). On CPU the way to force eviction: the tiny model's 128-token "
             "block is 256 KiB.")] = None,
    gpu_cache_gb: Annotated[Optional[float], typer.Option(
        help="G1 size in GB (10^9 bytes); same as --kv-cache-memory-bytes.")] = None,
    block_size: BlockSizeOpt = None,
    enable_prefix_caching: Annotated[bool, typer.Option(
        "--enable-prefix-caching/--no-enable-prefix-caching", help="vLLM's own prefix cache in G1.")] = True,
    max_model_len: Annotated[Optional[int], typer.Option(
        help="Longest request in tokens. Default for the tiny model: 16384, or what G1 holds.")] = None,
    cpu_cache_gb: Annotated[Optional[float], typer.Option(
        help="KVBM host tier (G2) in GB: sets DYN_KVBM_CPU_CACHE_GB.")] = None,
    disk_cache_gb: Annotated[Optional[float], typer.Option(
        help="KVBM disk tier (G3) in GB: sets DYN_KVBM_DISK_CACHE_GB.")] = None,
    disk_cache_dir: Annotated[Optional[str], typer.Option(help="Directory of the disk tier: sets DYN_KVBM_DISK_CACHE_DIR.")] = None,
    remote_url: Annotated[Optional[str], typer.Option(
        help="KVBM shared tier (G4) store, e.g. redis://host:6379/0 or file:///shared/dir: sets "
             "DYN_KVBM_REMOTE_URL (needs --cpu-cache-gb).")] = None,
    log_file: Annotated[Optional[Path], typer.Option(help="Write the engine's log here instead of streaming it "
                                                          "to stderr.", dir_okay=False)] = None,
    health_timeout: HealthTimeoutOpt = 600.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the exact command and environment; start nothing.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Run vLLM's OpenAI server with or without KVBM until Ctrl+C or SIGTERM. Arguments after `--` go to vLLM.

    G1 sizing: on a GPU use --gpu-memory-utilization (as Dynamo's demo does); on vLLM's CPU build use
    --kv-cache-memory-bytes or --gpu-cache-gb. KVBM's tiers: --cpu-cache-gb (G2), --disk-cache-gb and
    --disk-cache-dir (G3), --remote-url (G4); the DYN_KVBM_* variables already in the environment work as well.
    """
    options = {k: v for k, v in locals().items() if k in EngineSpec.model_fields}
    connector = Connector(connector).value
    try:
        spec = EngineSpec(**options | {"connector": connector, "vllm_args": list(ctx.args)})
    except ValidationError as exc:  # a bound of EngineSpec's fields (the same check for scenario files)
        raise flag_error(exc) from None
    launch = build_launch(spec)
    if dry_run and json_out:
        emit_json({"argv": launch.argv, "env_set": {k: shown(k, v) for k, v in launch.env_set.items()},
                   "env_unset": launch.env_unset, "url": launch.url, "notes": launch.notes})
        return
    for line in launch.notes:
        note(f"note: {line}")
    if dry_run:
        out().print(launch.shell(), markup=False, soft_wrap=True, highlight=False)
        return
    on_line = None if log_file else (lambda line: print(line, file=sys.stderr, flush=True))
    engine = Engine(launch, log_path=log_file, on_line=on_line)
    with sigterm_as_exception():
        try:
            took = start_and_wait(engine, health_timeout, f"vLLM ({connector})")
            out().print(f"ready: {launch.url} model={launch.model} connector={connector} (healthy after {took:.0f} s); "
                        "Ctrl+C stops it", markup=False, soft_wrap=True)
            sys.stdout.flush()
            engine.proc.wait()
            raise EngineFailed(engine.failure())
        except KeyboardInterrupt:
            note("stopping the engine ...")  # `finally` stops it
            raise typer.Exit(EXIT_INTERRUPTED)
        finally:
            engine.stop()
