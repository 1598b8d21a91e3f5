"""User errors become one `Error: ...` line on stderr and exit code 1, never a traceback.

Besides `UserError`, the file-system errors a user causes or can fix (a full disk, a read-only
or unwritable folder, a path that is a file where a folder is needed) are reported the same way,
naming the path and the fix: every write is atomic and every command resumable, so the fix is
always "make room (or choose another path) and run the same command again"."""

from __future__ import annotations

import errno

import typer
from typer.core import TyperGroup

from dpseg.errors import UserError

_FIXES = {
    errno.ENOSPC: "no space left on the device: free some space and run the same command again (it resumes; nothing "
    "half-written was kept)",
    errno.EDQUOT: "disk quota exceeded: free some space and run the same command again (it resumes)",
    errno.EROFS: "read-only file system: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to, or fix its permissions",
    errno.EISDIR: "is a folder: give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "already exists and is in the way: choose another path",
}


def os_error_line(err: OSError) -> str:
    where = err.filename or "a file"
    fix = _FIXES.get(err.errno, f"{err.strerror or type(err).__name__}: check the path and run the same command again")
    return f"{where}: {fix}"


def one_line(message: str) -> str:
    # a wrapped library message may span lines; the user gets exactly one
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


class UserErrorGroup(TyperGroup):
    """Root command group: reports `UserError` and file-system errors (raised anywhere below) as
    one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as err:
            typer.echo("Error: " + one_line(str(err)), err=True)
            raise typer.Exit(1) from None
        except OSError as err:
            typer.echo("Error: " + one_line(os_error_line(err)), err=True)
            raise typer.Exit(1) from None
