"""Where precision is fixed whatever the caller's autocast: cosine cost volumes, attention sums,
the sigmoid and the loss run in fp32 (SED trains in fp32 throughout; under bf16/fp16 autocast
these stay as SED computes them)."""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def fp32(tensor: torch.Tensor):
    """A region with autocast off on `tensor`'s device; cast the inputs with `.float()` inside it
    (autocast would otherwise run einsum/matmul in half precision even on fp32 inputs)."""
    if tensor.device.type not in AUTOCAST_DEVICES:  # meta tensors (model summary): nothing to switch off
        return contextlib.nullcontext()
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def kept_dtype(tensor: torch.Tensor) -> torch.dtype:
    """What an fp32 region hands back: fp32 under autocast (the next autocast op casts it as it
    needs), else the input's own dtype (a model cast whole to bf16 keeps running in bf16)."""
    device = tensor.device.type
    if device in AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.float32
    return tensor.dtype
