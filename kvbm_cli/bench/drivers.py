"""The external load generator aiperf (genai-perf's successor), its export imported into our result files.

aiperf takes genai-perf's flags, so the prefix-reuse options map one to one. It counts prompt lengths in message
text, not server tokens: requests.jsonl records the server's `usage.prompt_tokens` where aiperf saved it.
genai-perf cannot run where kvbm installs (its perf_analyzer binary is not on PyPI): the error names aiperf.

Operations:
  find_tool(driver), tool_command(exe, cfg, ...)   the executable (or how to get it); its command line
  run_external(driver, cfg, ...)                   run it and import its export: (records, command)
  import_aiperf(path, run, workload)               aiperf's profile_export.jsonl -> RequestRecords
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from kvbm_cli._output import err
from kvbm_cli._errors import CheckFailed, CliError
from kvbm_cli.results import RequestRecord


def find_tool(driver: str) -> str:
    """aiperf's executable, or a one-line CliError saying how to get it."""
    if driver == "genai-perf":
        raise CliError("genai-perf cannot run where kvbm installs: it needs NVIDIA's perf_analyzer binary, which is "
                       "not on PyPI (only in Triton's SDK container); use --driver aiperf (its successor: pip "
                       "install aiperf) or the native client")
    exe = shutil.which(driver)
    if exe is None:
        raise CliError("aiperf is not installed: pip install aiperf (0.13 works against vLLM's CPU server), or use "
                       "--driver native")
    return exe


def tool_command(exe: str, cfg: Any, *, url: str, model: str, tokenizer: str, out: Path) -> list[str]:
    """aiperf's genai-perf-style flags for a PrefixReuseConfig, whose fields are named as those flags."""
    names = ["endpoint_type", "synthetic_input_tokens_mean", "synthetic_input_tokens_stddev", "request_count",
             "warmup_request_count", "random_seed", "request_rate" if cfg.request_rate else "concurrency"]
    if cfg.num_prefix_prompts:
        names += ["prefix_prompt_length", "num_prefix_prompts"]
    if cfg.output_tokens_mean is not None:
        names += ["output_tokens_mean"] + (["output_tokens_stddev"] if cfg.output_tokens_stddev else [])
    values = cfg.model_dump() | {"concurrency": cfg.concurrency or 1}
    cmd = [exe, "profile", "-m", model, "--url", url, "--tokenizer", tokenizer, "--artifact-dir", str(out)]
    for name in names:
        cmd += ["--" + name.replace("_", "-"), str(values[name])]
    if cfg.output_tokens_mean is not None and cfg.ignore_eos:
        cmd += ["--extra-inputs", "ignore_eos:true"]
        if not cfg.output_tokens_stddev:
            cmd += ["--extra-inputs", f"min_tokens:{cfg.output_tokens_mean}"]
    return cmd + (["--streaming"] if cfg.streaming else []) + ["--ui", "none"]


def _metric(metrics: dict, name: str) -> Any:
    entry = metrics.get(name)
    return entry.get("value") if isinstance(entry, dict) else None


def import_aiperf(path: Path, run: str, workload: str) -> list[RequestRecord]:
    """One RequestRecord per line of aiperf's profile_export.jsonl (warm-up phase marked)."""
    records = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        md, m = d.get("metadata", {}), d.get("metrics", {})
        error = d.get("error")
        ttft, e2e = _metric(m, "time_to_first_token"), _metric(m, "request_latency")
        itl = _metric(m, "inter_chunk_latency") or []
        records.append(RequestRecord(
            request_id=str(md.get("x_request_id") or md.get("x_correlation_id") or len(records)), run=run,
            workload=workload, start_s=(md.get("request_start_ns") or 0) / 1e9,
            ttft_s=None if error or ttft is None else ttft / 1000, itl_s=[] if error else [x / 1000 for x in itl],
            e2e_s=None if error or e2e is None else e2e / 1000,
            input_tokens=int(_metric(m, "usage_prompt_tokens") or _metric(m, "input_sequence_length")
                             or _metric(m, "error_isl") or 0),
            output_tokens=0 if error else int(_metric(m, "usage_completion_tokens") or _metric(m, "output_token_count") or 0),
            warmup=md.get("benchmark_phase") == "warmup",
            error=None if not error else f"{error.get('type', 'error')}: {error.get('message', '')}"[:300]))
    return records


def run_external(driver: str, cfg: Any, *, url: str, model: str, tokenizer: str, artifact_dir: Path,
                 run: str) -> tuple[list[RequestRecord], list[str]]:
    """Run aiperf for a prefix-reuse config; (its export as RequestRecords, the command it ran)."""
    exe = find_tool(driver)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    cmd = tool_command(exe, cfg, url=url, model=model, tokenizer=tokenizer, out=artifact_dir / driver)
    env = dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)  # aiperf 0.13 cannot load a local tokenizer directory in offline mode
    log = artifact_dir / f"{driver}.log"
    err().print(f"running {driver}: {' '.join(cmd)}", markup=False, soft_wrap=True)
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    export = artifact_dir / driver / "profile_export.jsonl"
    if rc != 0 or not export.is_file():
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        raise CheckFailed(f"{driver} exited with status {rc} (log {log}): {tail[0].strip()[:200]}")
    return import_aiperf(export, run, cfg.name), cmd
