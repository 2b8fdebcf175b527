"""`kvbm report RUN_DIR... --out DIR`: the report of kvbm_cli.report, its table and findings on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvbm_cli._options import JsonOpt, NBootOpt, SeedOpt
from kvbm_cli._output import emit_json, markdown, out
from kvbm_cli.report import build_report
from kvbm_cli.results import load_run


def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (requests.jsonl, summary.json, metrics.csv); "
                                                    "the first is the reference.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("report"),
    title: Annotated[str, typer.Option("--title", help="Page title.")] = "KVBM benchmark report",
    n_boot: NBootOpt = 2000,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Render an HTML page, a Markdown summary and PNGs comparing bench runs (ratios against the first)."""
    result = build_report([load_run(r) for r in runs], out_dir, n_boot=n_boot, seed=seed, title=title)
    if json_out:
        emit_json({k: v for k, v in result.items() if k != "table"})
        return
    table = result["table"]
    lines = [markdown(list(table[0]), [row.values() for row in table]), *[f"- {x}" for x in result["findings"]],
             f"wrote {', '.join(result['files'])} to {result['out']}"]
    out().print("\n".join(lines), markup=False, soft_wrap=True)
