"""Errors that reach the user as one line naming the thing and the fix."""

from __future__ import annotations

import errno
import re


class UserError(Exception):
    """Bad input or state the user can fix; the CLI prints it as one `Error:` line."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of a (possibly long, multi-line) library error, for a one-line message."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


def one_line(message: str) -> str:
    # a wrapped library message may span lines; the user gets exactly one
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


_RESUMES = "run the same command again (it resumes; nothing half-written was kept)"
_FIXES = {
    errno.ENOSPC: f"no space left on the device{{needs}}: free some space and {_RESUMES}",
    errno.EDQUOT: f"disk quota exceeded{{needs}}: free some space and {_RESUMES}",
    errno.EFBIG: f"file too large for this process's file-size limit (`ulimit -f`){{needs}}: raise the limit "
    f"and {_RESUMES}",
    errno.EROFS: "read-only file system: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to, or fix its permissions",
    errno.EISDIR: "is a folder: give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "already exists and is in the way: choose another path",
}


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def os_error_line(err: OSError) -> str:
    """A file-system error as `<file>: <what happened and the fix>`; a write that failed for want of
    space (dpseg.io names the file) also says how many bytes it was writing."""
    where = err.filename or "a file"
    needed = getattr(err, "needed", None)
    needs = f" (writing it needs {_size(needed)})" if needed else ""
    fix = _FIXES.get(err.errno)
    if fix is None:
        return f"{where}: {err.strerror or type(err).__name__}: check the path and run the same command again"
    return f"{where}: {fix.replace('{needs}', needs)}"


_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*\nOriginal Traceback")


def worker_message(message: str) -> str | None:
    """The original message of an error a DataLoader worker raised: PyTorch re-raises it in the
    main process with the worker's whole traceback as its message."""
    if not _WORKER.match(message):
        return None
    lines = message.rstrip().splitlines()
    last_frame = max((i for i, line in enumerate(lines) if line.startswith(" ")), default=1)
    tail = "\n".join(lines[last_frame + 1 :]).strip()
    return re.sub(r"^[\w.]+: ", "", tail, count=1) or tail


def error_line(err: BaseException) -> str | None:
    """The one line a user sees for `err` (without `Error: `), or None for an error that is a bug."""
    if isinstance(err, UserError):
        text = str(err)
        return one_line(worker_message(text) or text)
    if isinstance(err, OSError):
        original = worker_message(str(err)) if err.errno is None else None
        return one_line(original if original is not None else os_error_line(err))
    return None
