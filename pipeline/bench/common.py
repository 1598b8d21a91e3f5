"""What every benchmark shares: device synchronisation around timed regions, SED's reference."""

from __future__ import annotations

import torch

# the figure dpseg's latency is compared against (SED paper: whole model, ConvNeXt-B, 768 px)
SED_REFERENCE = {"sed_ms_per_image": 82, "sed_device": "A6000", "sed_note": "SED paper, whole model, ConvNeXt-B, 768"}


def sync(device: str | torch.device) -> None:
    """Waits for queued GPU work, so a timer read after it measures the work (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
