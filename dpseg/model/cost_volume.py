"""Cost volumes: cosine similarity between image features and prompt embeddings.

Prompts are (N, M, C) — shared by the batch — or (B, N, M, C) — per image, as in pass II.
Outputs are (B, M, N, H, W), the layout of the paper's Eq. 1 and Eq. 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_cost(features: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """cos(features[b, :, h, w], prompts[(b,) n, m, :]) -> (B, M, N, H, W)."""
    f = F.normalize(features, dim=1)
    p = F.normalize(prompts.to(f.dtype), dim=-1)
    if p.dim() == 3:
        return torch.einsum("bchw,nmc->bmnhw", f, p)
    if p.dim() == 4:
        return torch.einsum("bchw,bnmc->bmnhw", f, p)
    raise ValueError(f"prompts must be (N, M, C) or (B, N, M, C), got {tuple(prompts.shape)}")


def dual_prompt_embeddings(text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Eq. 1's E: the average of the L2-normalised text and visual prompt embeddings."""
    if visual.dim() == 4 and text.dim() == 3:
        text = text.unsqueeze(0).expand(visual.shape[0], *text.shape)
    return (F.normalize(text, dim=-1) + F.normalize(visual.to(text.dtype), dim=-1)) / 2


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
