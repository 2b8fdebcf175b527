"""The `kvbm` Typer app, assembled here and only here: each command module is imported and registered below;
no command module imports this one."""

from __future__ import annotations

from kvbm_cli import doctor, gate, metrics, model, report, serve, size
from kvbm_cli._errors import run_app
from kvbm_cli._options import group
from kvbm_cli.bench import compare, hit_rate, multi_round, prefix_reuse, soak, transfer, ttft

app = group("KVBM toolkit: run engines with and without the tiered KV-cache block manager and measure what it buys.")
bench_app = group("Drive workloads and measure: transfer throughput, TTFT, prefix reuse, multi-round QA, soak.")

app.command("serve", options_metavar="[OPTIONS] [-- VLLM_ARGS...]",
            context_settings={"allow_extra_args": True, "ignore_unknown_options": False})(serve.serve)
app.add_typer(bench_app, name="bench")
for name, command in (("transfer", transfer.transfer), ("ttft", ttft.ttft), ("prefix-reuse", prefix_reuse.prefix_reuse),
                      ("multi-round", multi_round.multi_round), ("hit-rate", hit_rate.hit_rate), ("compare", compare.compare),
                      ("soak", soak.soak)):
    bench_app.command(name)(command)
app.add_typer(doctor.doctor_app, name="doctor")
app.command("gate")(gate.gate_cmd)
app.add_typer(metrics.metrics_app, name="metrics")
app.add_typer(model.model_app, name="model")
app.command("report")(report.report_cmd)
app.command("size")(size.size)


def main() -> None:
    """Console-script entry point."""
    run_app(app)


if __name__ == "__main__":
    main()
