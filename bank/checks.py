"""The image check: a generated image that is NaN, black or near-constant (SD's safety checker
and fp16 overflow both produce such images silently) is never stored as a valid entry."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

MAX_BLACK = 0.02  # every pixel at most this bright (0..1): "black"
MIN_STD = 0.01  # standard deviation over all pixels and channels below this: "constant"
RETRIES = 2  # attempts with derived seeds after the first


@dataclass
class CheckResult:
    ok: bool
    reason: str | None  # "nan", "black", "constant" or a generator's own reason
    mean: float
    std: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def check_images(images: torch.Tensor) -> list[CheckResult]:
    """images: (B, 3, H, W) floats meant to be in [0, 1], on any device."""
    x = images.float().flatten(1)
    finite = torch.isfinite(x).all(dim=1)
    safe = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    mean, std, peak = safe.mean(dim=1), safe.std(dim=1), safe.amax(dim=1)
    results = []
    for f, m, s, p in zip(finite.tolist(), mean.tolist(), std.tolist(), peak.tolist(), strict=False):
        reason = "nan" if not f else "black" if p <= MAX_BLACK else "constant" if s < MIN_STD else None
        results.append(CheckResult(reason is None, reason, round(m, 5), round(s, 5)))
    return results


def thresholds() -> dict:
    return {"max_black": MAX_BLACK, "min_std": MIN_STD, "retries": RETRIES}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, H, W, C) uint8, on the same device."""
    x = torch.nan_to_num(images.float(), nan=0.0).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()
