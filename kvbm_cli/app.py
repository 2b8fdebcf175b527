"""The `kvbm` Typer app, assembled in one place: one module per command group."""

from __future__ import annotations

import typer

from kvbm_cli._errors import run_app

app = typer.Typer(
    name="kvbm",
    help="KVBM toolkit: run engines with and without the tiered KV-cache block manager and measure what it buys.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

bench_app = typer.Typer(help="Drive workloads and measure: transfer throughput, prefix reuse, multi-round QA.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _register() -> None:
    """Import the command modules; each adds its commands to `app` or `bench_app`."""
    from kvbm_cli import (  # noqa: F401
        bench,
        bench_transfer,
        bench_ttft,
        doctor,
        gate,
        metrics,
        model,
        report,
        serve,
        size,
    )


_register()


def main() -> None:
    """Console-script entry point."""
    run_app(app)


if __name__ == "__main__":
    main()
