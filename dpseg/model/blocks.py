"""Decoder building blocks. Tensors between blocks are (B, N, C, H, W): batch, classes,
channels, space. Every block treats classes alike (no class order), as open vocabularies need."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

AttentionSummary = tuple[torch.Tensor, torch.Tensor]  # (sum_n k v^T, sum_n k) per pixel and head


class HybridDilatedConv(nn.Module):
    """Three 3x3 convs with dilations 1, 2, 4, summed: a wide receptive field without gridding."""

    def __init__(self, dim: int, dilations: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=d, dilation=d) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.convs)


class ClassAttention(nn.Module):
    """Self-attention across categories at every pixel, in linear (kernelised) form.

    Softmax attention over 847 classes at stride 8 does not fit; the linear form's keys and
    values reduce to a per-pixel summary (sum over classes), so classes can be decoded in
    chunks against a summary of *all* classes and give the one-pass result exactly.
    """

    def __init__(self, dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.heads, self.eps = heads, eps
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor):
        """x (B, N, H, W, C) -> q, k, v (B, N, H, W, heads, C/heads); q, k positive (elu + 1)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(-3)
        return F.elu(q) + 1, F.elu(k) + 1, v

    def summarize(self, x: torch.Tensor) -> AttentionSummary:
        _, k, v = self._qkv(x)
        k, v = k.float(), v.float()  # sums over hundreds of classes: keep them in fp32
        return torch.einsum("bnxyhd,bnxyhe->bxyhde", k, v), k.sum(dim=1)

    def forward(self, x: torch.Tensor, summary: AttentionSummary | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x)
        if summary is None:
            k, v = k.float(), v.float()
            summary = torch.einsum("bnxyhd,bnxyhe->bxyhde", k, v), k.sum(dim=1)
        kv, k_sum = summary
        q = q.float()
        numerator = torch.einsum("bnxyhd,bxyhde->bnxyhe", q, kv)
        denominator = torch.einsum("bnxyhd,bxyhd->bnxyh", q, k_sum).unsqueeze(-1)
        out = (numerator / (denominator + self.eps)).to(x.dtype).flatten(-2)
        return self.proj(out)


class AggregationBlock(nn.Module):
    """Paper §4.2: hybrid dilated conv -> norm -> GELU MLP -> self-attention across categories,
    each with a residual connection."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.spatial = HybridDilatedConv(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.attention = ClassAttention(dim, heads)

    def _before_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C, H, W) -> channels-last (B, N, H, W, C) after the spatial conv and the MLP."""
        b, n, c, h, w = x.shape
        y = x.flatten(0, 1)
        y = (y + self.spatial(y)).view(b, n, c, h, w).permute(0, 1, 3, 4, 2)
        return y + self.mlp(self.norm1(y))

    def summarize(self, x: torch.Tensor) -> AttentionSummary:
        return self.attention.summarize(self.norm2(self._before_attention(x)))

    def forward(self, x: torch.Tensor, summary: AttentionSummary | None = None) -> torch.Tensor:
        y = self._before_attention(x)
        y = y + self.attention(self.norm2(y), summary)
        return y.permute(0, 1, 4, 2, 3)


class CostGuidance(nn.Module):
    """A 1x1 conv from cost channels (M templates) to a stage's width, computed without
    materialising the cost volume.

    For the visual cost volume (Eq. 2) the conv is folded into the prompts:
    sum_m W[k, m] cos(F, P_m) = <F/|F|, sum_m W[k, m] P_m/|P_m|>, so the (B, M, N, H, W)
    volume (5 GB at stride 4 for A-847) never exists. For the upsampled initial cost volume
    (Table 3's ablation) the conv runs at stride 32 and the result is upsampled: bilinear
    interpolation is linear with weights summing to one, so both orders give the same values.
    """

    def __init__(self, cost_channels: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, cost_channels))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def from_prompts(self, features: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """features (B, C, H, W), prompts (N, M, C) or (B, N, M, C) -> (B, N, dim, H, W)."""
        f = F.normalize(features, dim=1)
        p = F.normalize(prompts.to(f.dtype), dim=-1)
        folded = torch.einsum("km,...nmc->...nkc", self.weight.to(f.dtype), p)
        pattern = "bchw,nkc->bnkhw" if folded.dim() == 3 else "bchw,bnkc->bnkhw"
        return torch.einsum(pattern, f, folded) + self.bias.to(f.dtype).view(1, 1, -1, 1, 1)

    def from_cost(self, cost: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """cost (B, M, N, h, w) -> (B, N, dim, H, W), upsampled bilinearly to `size`."""
        y = torch.einsum("km,bmnhw->bnkhw", self.weight.to(cost.dtype), cost)
        y = y + self.bias.to(cost.dtype).view(1, 1, -1, 1, 1)
        b, n = y.shape[:2]
        y = F.interpolate(y.flatten(0, 1), size=size, mode="bilinear", align_corners=False)
        return y.view(b, n, -1, *size)


class StageFusion(nn.Module):
    """One conv over concat(upsampled decoder state, encoder skip, visual guidance), written as
    the sum of its three parts so the class-independent skip is convolved once per image
    instead of once per class (the same numbers as convolving the broadcast concat)."""

    def __init__(self, dim: int, skip_channels: int, kernel: int = 3):
        super().__init__()
        pad = kernel // 2
        self.from_state = nn.Conv2d(dim, dim, kernel, padding=pad)
        self.from_skip = nn.Conv2d(skip_channels, dim, kernel, padding=pad, bias=False)
        self.from_guidance = nn.Conv2d(dim, dim, kernel, padding=pad, bias=False)

    def forward(self, state: torch.Tensor, skip: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        b, n, _, h, w = state.shape
        per_class = self.from_state(state.flatten(0, 1)) + self.from_guidance(guidance.flatten(0, 1))
        out = per_class.view(b, n, -1, h, w) + self.from_skip(skip).unsqueeze(1)
        return F.gelu(out)
