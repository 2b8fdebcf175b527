"""kvbm toolkit: the `kvbm` command line. Uses the library only through its public API and the engine only
through processes and HTTP."""
