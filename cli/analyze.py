"""`dpseg analyze ...`: the paper's analyses (planned)."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Adds this module's commands to the root app (and its benchmarks to `dpseg bench`)."""
