"""Cost volumes: cosine similarity between image features and prompt embeddings.

Prompts are (N, M, C) — shared by the batch — or (B, N, M, C) — per image, as in pass II.
Outputs are (B, M, N, H, W), the layout of the paper's Eq. 1 and Eq. 2. Cosines are computed
in fp32 whatever the autocast (SED computes them in fp32; bf16 keeps 8 bits of mantissa, so
cosines near each other across 80 templates and hundreds of classes would tie).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpseg.precision import fp32, kept_dtype


def cosine_cost(features: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """cos(features[b, :, h, w], prompts[(b,) n, m, :]) -> (B, M, N, H, W)."""
    if prompts.dim() not in (3, 4):
        raise ValueError(f"prompts must be (N, M, C) or (B, N, M, C), got {tuple(prompts.shape)}")
    dtype = kept_dtype(features)
    with fp32(features):
        f = F.normalize(features.float(), dim=1)
        p = F.normalize(prompts.to(device=f.device, dtype=torch.float32), dim=-1)
        pattern = "bchw,nmc->bmnhw" if p.dim() == 3 else "bchw,bnmc->bmnhw"
        return torch.einsum(pattern, f, p).to(dtype)


def dual_prompt_embeddings(text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Eq. 1's E: the average of the L2-normalised text and visual prompt embeddings."""
    if visual.dim() == 4 and text.dim() == 3:
        text = text.unsqueeze(0).expand(visual.shape[0], *text.shape)
    with fp32(text):
        return (F.normalize(text.float(), dim=-1) + F.normalize(visual.float(), dim=-1)) / 2


def initial_cost(
    dense: torch.Tensor, text: torch.Tensor | None, visual: torch.Tensor | None, prompt_mode: str, fusion: str
) -> torch.Tensor:
    """The stride-32 cost volume the decoder starts from, per prompt mode and fusion (Table 2b)."""
    if prompt_mode == "text":
        return cosine_cost(dense, text)
    if prompt_mode == "visual":
        return cosine_cost(dense, visual)
    if fusion == "avg-embeddings":
        return cosine_cost(dense, dual_prompt_embeddings(text, visual))
    text_cost, visual_cost = cosine_cost(dense, text), cosine_cost(dense, visual)
    if fusion == "avg-costs":
        return (text_cost + visual_cost) / 2
    return torch.cat([text_cost, visual_cost], dim=1)  # concat-costs: 2M channels


def crop_channels(cost: torch.Tensor, crops: torch.Tensor | None, templates: int) -> torch.Tensor:
    """(B, M', N, h, w) -> (B, M' + M, N, h, w): the last M channels (the visual prompts' slots)
    split into the bank's share and the crops' share, by the (B, N, M) marks of the slots that
    hold a crop of the image (None: no slot does), so that each reaches weights of its own."""
    visual = cost[:, -templates:]
    if crops is None:
        return torch.cat([cost, torch.zeros_like(visual)], dim=1)
    marks = crops.to(device=cost.device, dtype=cost.dtype).permute(0, 2, 1)[..., None, None]  # (B, M, N, 1, 1)
    return torch.cat([cost[:, :-templates], visual * (1 - marks), visual * marks], dim=1)
