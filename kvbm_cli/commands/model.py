"""`kvbm model tiny [--out DIR]`: write the embedded tiny Qwen3-shaped model to DIR, or (without --out) make
once and print the cached default used when --model is absent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kvbm_cli._options import group
from kvbm_cli._output import out
from kvbm_cli.tiny_model import default_model_dir, make_tiny_model

model_app = group(help="The embedded default model: a tiny Qwen3-shaped model vLLM's CPU build serves.")


@model_app.command("tiny")
def tiny(
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Directory to write (created if missing). Default: the cached copy other commands use.",
        file_okay=False)] = None,
) -> None:
    """Write the tiny Qwen3-shaped model (config, tokenizer, seeded random weights) and print its path."""
    path = make_tiny_model(out_dir) if out_dir is not None else default_model_dir()
    out().print(str(path), soft_wrap=True)
