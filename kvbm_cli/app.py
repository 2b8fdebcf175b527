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
    from kvbm_cli import bench_transfer  # noqa: F401

    for optional in ("kvbm_cli.model", "kvbm_cli.size", "kvbm_cli.doctor", "kvbm_cli.metrics", "kvbm_cli.report",
                     "kvbm_cli.gate"):
        try:
            __import__(optional)
        except ModuleNotFoundError as exc:
            if exc.name != optional:
                raise


_register()


def main() -> None:
    """Console-script entry point."""
    run_app(app)


if __name__ == "__main__":
    main()
