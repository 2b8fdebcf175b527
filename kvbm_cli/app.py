"""The `kvbm` Typer app, assembled here and only here from one module per command group (kvbm_cli/commands/);
no command module imports this one."""

from __future__ import annotations

from kvbm_cli._errors import run_app
from kvbm_cli._options import group
from kvbm_cli.commands import bench, doctor, gate, metrics, model, report, serve, size

app = group("KVBM toolkit: run engines with and without the tiered KV-cache block manager and measure what it buys.")
app.command("serve", options_metavar="[OPTIONS] [-- VLLM_ARGS...]",
            context_settings={"allow_extra_args": True, "ignore_unknown_options": False})(serve.serve)
app.add_typer(bench.bench_app, name="bench")
app.add_typer(doctor.doctor_app, name="doctor")
app.command("gate")(gate.gate)
app.add_typer(metrics.metrics_app, name="metrics")
app.add_typer(model.model_app, name="model")
app.command("report")(report.report)
app.command("size")(size.size)


def main() -> None:  # the console script
    run_app(app)


if __name__ == "__main__":
    main()
