"""`python -m kvbm_cli` runs the `kvbm` command line."""

from kvbm_cli.app import main

main()
