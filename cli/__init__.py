"""The `dpseg` command line: thin Typer wrappers over `pipeline` and `bank`."""
