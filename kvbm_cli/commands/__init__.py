"""The Typer layer of `kvbm`: one module per command group (options -> one call into a Typer-free module ->
render). kvbm_cli.app assembles them; nothing here imports the app, and no Typer-free module imports this."""
