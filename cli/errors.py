"""User errors become one `Error: ...` line on stderr and exit code 1, never a traceback.

Besides `UserError`, the file-system errors a user causes or can fix (a full disk, a quota, a
file-size limit, a read-only or unwritable folder, a path that is a file where a folder is needed)
are reported the same way, naming the path and the fix: every write is atomic and every command
resumable, so the fix is always "make room (or choose another path) and run the same command
again". An error raised in a data-loader worker reads as it would in the main process."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from dpseg.errors import UserError, error_line, one_line, os_error_line  # noqa: F401 (re-exported)


class UserErrorGroup(TyperGroup):
    """Root command group: reports `UserError` and file-system errors (raised anywhere below) as
    one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, OSError) as err:
            typer.echo("Error: " + error_line(err), err=True)
            raise typer.Exit(1) from None
