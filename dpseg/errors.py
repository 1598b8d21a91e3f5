"""Errors that reach the user as one line naming the thing and the fix."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or state the user can fix; the CLI prints it as one `Error:` line."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of a (possibly long, multi-line) library error, for a one-line message."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
