"""Process group and device: one `accelerate` PartialState for builds on one or many ranks."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from dpseg.errors import UserError

        raise UserError(f"--device {device}: no CUDA GPU is visible to this process; use --device cpu (or auto)")
    return device


def distributed_state(device: str = "auto"):
    """Under `accelerate launch` every rank gets its own index; on CPU the state must be made
    with cpu=True (a plain one gives every process rank 0 there)."""
    from accelerate import PartialState

    return PartialState(cpu=resolve_device(device) == "cpu")


def rank_device(state, device: str) -> str:
    device = resolve_device(device)
    if device.startswith("cuda") and state.device.type == "cuda":
        return str(state.device)
    return device
