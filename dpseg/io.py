"""Atomic file writes (a reader sees the old file or the new one, never half of one), files that
follow the umask, and the lock that gives an output folder one writer at a time."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dpseg.errors import UserError


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask() can only
    be read by setting it, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_failed(err: OSError, path: str | os.PathLike, needed: int | None = None) -> OSError:
    """`err` naming `path` (a full disk or a file-size limit names no file) and, where known, the
    bytes the write needed: what the one-line error tells the user."""
    failed = OSError(err.errno, err.strerror, str(err.filename if err.filename is not None else path))
    failed.needed = needed if needed is not None else getattr(err, "needed", None)
    return failed


def renamed(err: OSError, name: str | os.PathLike) -> OSError:
    """`err` naming `name` instead: a file written under a temporary name, named as the user knows it."""
    failed = OSError(err.errno, err.strerror, str(name))
    failed.needed = getattr(err, "needed", None)
    return failed


def atomic_write_bytes(path: str | os.PathLike, data: bytes, sync: bool = True) -> None:
    """`sync=False` skips the fsync: still whole-or-nothing against a killed process, just not
    against power loss (for bulk writes such as dataset preparation). The file gets the mode a
    plain `open()` would give it (0644 under umask 022), not mkstemp's private 0600, so other
    users can read banks and datasets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise write_failed(err, path, len(data)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2, sync: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode(), sync)


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of torch tensors, written atomically with the umask's mode
    (safetensors' own save_file makes 0600 files and names no file when the disk is full)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies `src` to `dst` atomically, with the umask's mode."""
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f, open(src, "rb") as s:
            for block in iter(lambda: s.read(1 << 22), b""):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise write_failed(err, dst, os.path.getsize(src)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- one writer per output folder ------------------------------------------------------------

LOCK_FILE = ".lock"


def _holder_record(command: str) -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
    }


def _read_holder(fd: int) -> dict | str | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return text  # a record of another format: shown as it is
    return record if isinstance(record, dict) else text


def describe_holder(holder: dict | str | None) -> str:
    if not isinstance(holder, dict):
        return holder or "another process"
    where = "this host" if holder.get("host") == socket.gethostname() else f"host {holder.get('host')}"
    return f"pid {holder.get('pid')} on {where}, started {holder.get('started')}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def stale_note(path: Path, holder: dict | str) -> str:
    """One line on a lock whose holder left its record behind (it was killed) but holds no lock."""
    if isinstance(holder, dict) and holder.get("host") == socket.gethostname():
        why = "is no longer running" if not _pid_alive(holder.get("pid")) else "no longer holds it"
        return f"note: {path} was left by {describe_holder(holder)}, which {why}; taking the folder over"
    return (
        f"note: {path} was left by {describe_holder(holder)}, whose lock is free: that run has ended (or this "
        f"file system does not share locks between hosts: then stop one of the two runs); taking the folder over"
    )


@contextlib.contextmanager
def folder_lock(
    folder: str | os.PathLike, command: str, doing: str = "writing into", name: str = LOCK_FILE, hold: bool = True
) -> Iterator[None]:
    """Held for a whole run by one process: a second `command` into `folder` is refused in one line
    naming the holder, never waits. An flock is released by the kernel when its process dies, so a
    killed run never blocks the next one; the record it leaves (pid, host, start) is reported in one
    line and taken over. `hold=False` (the other ranks of one launch, whose main rank holds it) is a
    no-op. The file is removed on release, so finished output folders hold no lock files (and a
    folder the lock created is removed again if nothing was written into it)."""
    if not hold:
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(
                f"another `{command}` ({describe_holder(holder)}) is {doing} {folder}; wait for it to finish "
                f"(then run this again), or stop it"
            ) from None
        # the previous holder removes the file before it unlocks: a lock on a removed file is no lock
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = _read_holder(fd)
        if previous is not None:
            print(stale_note(path, previous), file=sys.stderr)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_holder_record(command)) + "\n").encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if created:  # a run refused before it wrote anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()
