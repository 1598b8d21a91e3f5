"""User errors become one `Error: ...` line and exit code 1, never a traceback."""

from __future__ import annotations

import click
from typer.core import TyperGroup

from dpseg.errors import UserError


class UserErrorGroup(TyperGroup):
    """Root command group: translates `UserError` (raised anywhere below) for Click."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            raise click.ClickException(str(err)) from None
