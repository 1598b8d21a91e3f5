"""User errors become one `Error: ...` line on stderr and exit code 1, never a traceback."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from dpseg.errors import UserError


class UserErrorGroup(TyperGroup):
    """Root command group: reports `UserError` (raised anywhere below) as one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as err:
            # a wrapped library message may span lines; the user gets exactly one
            typer.echo("Error: " + " ".join(part.strip() for part in str(err).splitlines() if part.strip()), err=True)
            raise typer.Exit(1) from None
