"""Errors that reach the user as one line naming the thing and the fix."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or state the user can fix; the CLI prints it as one `Error:` line."""
