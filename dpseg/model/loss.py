"""Per-pixel binary cross-entropy over classes (SED's objective)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpseg.errors import UserError
from dpseg.precision import fp32


def segmentation_bce(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, policy: str = "negative"
) -> torch.Tensor:
    """logits (B, N, h, w) at any stride, labels (B, H, W) of train ids.

    Computed in fp32 whatever the caller's autocast. Logits are upsampled bilinearly to the
    label size. Ignored pixels (`ignore_index`):
    - "negative" (SED): kept, with an all-zero target — every class is pushed down there;
    - "exclude": left out of the mean.
    """
    with fp32(logits):
        return _bce(logits.float(), labels, ignore_index, policy)


def _bce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, policy: str) -> torch.Tensor:
    n = logits.shape[1]
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    labels = labels.long()
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= n))
    if bad.any():
        raise UserError(
            f"labels hold train ids {sorted(labels[bad].unique().tolist())[:5]} outside 0..{n - 1} "
            f"(and not the ignore value {ignore_index})"
        )
    target = F.one_hot(torch.where(valid, labels, 0), n).permute(0, 3, 1, 2).to(logits.dtype)
    target = target * valid.unsqueeze(1)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if policy == "negative":
        return loss.mean()
    if policy == "exclude":
        mask = valid.unsqueeze(1).to(loss.dtype)
        return (loss * mask).sum() / (mask.sum() * n).clamp_min(1)
    raise UserError(f"ignore policy {policy!r} is not one of negative, exclude")


def deep_supervision_bce(
    logits: torch.Tensor,
    aux_logits: list[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int = 255,
    policy: str = "negative",
) -> torch.Tensor:
    """SED's training objective: the BCE of the final logits plus, unweighted, the BCE of every
    aux head's logits (each upsampled to the label size). With no aux logits it is the plain BCE."""
    total = segmentation_bce(logits, labels, ignore_index, policy)
    for aux in aux_logits:
        total = total + segmentation_bce(aux, labels, ignore_index, policy)
    return total
