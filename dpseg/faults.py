"""Fault injection for the kill-and-resume tests of every resumable job (bank build, training).

`ENV=name:n` (e.g. DPSEG_BANK_CRASH=merge:1) SIGKILLs the process the n-th time it reaches the
point `name`: a real kill at a chosen moment, so resume is tested against the exact state a
pre-empted job leaves behind."""

from __future__ import annotations

import os
import signal


def crash_point(env_var: str, name: str) -> None:
    spec = os.environ.get(env_var)
    if not spec or not spec.startswith(name + ":"):
        return
    counter = f"_{env_var}_COUNT_{name}"
    count = int(os.environ.get(counter, "0")) + 1
    os.environ[counter] = str(count)
    if count >= int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)
