"""Decoder building blocks. Tensors between blocks are (B, N, C, H, W): batch, classes,
channels, space. Every block treats classes alike (no class order), as open vocabularies need."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

AttentionSummary = tuple[torch.Tensor, torch.Tensor]  # (sum_n k v^T, sum_n k) per pixel and head


def group_norm_groups(channels: int) -> int:
    """SED's DoubleConv: one GroupNorm group per 16 channels (at least one)."""
    return max(1, channels // 16)


class HybridDilatedConv(nn.Module):
    """Three 3x3 convs with dilations 1, 2, 4, summed: a wide receptive field without gridding.
    Depthwise by default (SED's spatial block is a depthwise ConvNeXt block; the MLP mixes channels)."""

    def __init__(self, dim: int, dilations: tuple[int, ...] = (1, 2, 4), depthwise: bool = True):
        super().__init__()
        groups = dim if depthwise else 1
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=d, dilation=d, groups=groups) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.convs)


class ClassAttention(nn.Module):
    """Self-attention across categories at every pixel, in linear (kernelised, elu+1) form as SED.

    The linear form's keys and values reduce to a per-pixel summary (sum over classes), so
    classes can be decoded in chunks against a summary of *all* classes and give the one-pass
    result exactly.
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

    @staticmethod
    def _summary(k: torch.Tensor, v: torch.Tensor) -> AttentionSummary:
        k, v = k.float(), v.float()  # sums over hundreds of classes: keep them in fp32
        return torch.einsum("bnxyhd,bnxyhe->bxyhde", k, v), k.sum(dim=1)

    def _part(self, x: torch.Tensor, parts: slice) -> torch.Tensor:
        """Rows `parts` (in thirds: q, k, v) of the qkv projection, so chunked decoding computes
        k, v for the summary and q for the output once each, as the one-pass path does."""
        dim = self.proj.in_features
        rows = slice(parts.start * dim, parts.stop * dim)
        out = F.linear(x, self.qkv.weight[rows], self.qkv.bias[rows])
        return out.unflatten(-1, (parts.stop - parts.start, self.heads, -1))

    def summarize(self, x: torch.Tensor) -> AttentionSummary:
        k, v = self._part(x, slice(1, 3)).unbind(-3)
        return self._summary(F.elu(k) + 1, v)

    def forward(self, x: torch.Tensor, summary: AttentionSummary | None = None) -> torch.Tensor:
        if summary is None:
            q, k, v = self._qkv(x)
            summary = self._summary(k, v)
        else:
            q = F.elu(self._part(x, slice(0, 1)).squeeze(-3)) + 1
        kv, k_sum = summary
        q = q.float()
        numerator = torch.einsum("bnxyhd,bxyhde->bnxyhe", q, kv)
        denominator = torch.einsum("bnxyhd,bxyhd->bnxyh", q, k_sum).unsqueeze(-1)
        out = (numerator / (denominator + self.eps)).to(x.dtype).flatten(-2)
        return self.proj(out)


class AggregationBlock(nn.Module):
    """Paper §4.2: hybrid dilated conv -> norm -> GELU MLP -> self-attention across categories,
    each with a residual connection. Class attention runs on a grid average-pooled by
    `pool_train` in training and `pool_eval` at evaluation (SED: 2x2 and 1x1) and is upsampled
    back bilinearly (align_corners=True, as SED)."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: int, depthwise: bool = True, pool_train: int = 2, pool_eval: int = 1
    ):
        super().__init__()
        self.spatial = HybridDilatedConv(dim, depthwise=depthwise)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.attention = ClassAttention(dim, heads)
        self.pool_train, self.pool_eval = pool_train, pool_eval

    @property
    def pool(self) -> int:
        return self.pool_train if self.training else self.pool_eval

    def _before_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C, H, W) -> channels-last (B, N, H, W, C) after the spatial conv and the MLP."""
        b, n, c, h, w = x.shape
        y = x.flatten(0, 1)
        y = (y + self.spatial(y)).view(b, n, c, h, w).permute(0, 1, 3, 4, 2)
        return y + self.mlp(self.norm1(y))

    def _attention_input(self, y: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            b, n, h, w, c = y.shape
            pooled = F.avg_pool2d(y.reshape(b * n, h, w, c).permute(0, 3, 1, 2), self.pool, ceil_mode=True)
            y = pooled.permute(0, 2, 3, 1).reshape(b, n, *pooled.shape[-2:], c)
        return self.norm2(y)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before class attention: (B, N, C, H, W) -> channels-last (B, N, H, W, C)."""
        return self._before_attention(x)

    def summarize_prepared(self, y: torch.Tensor) -> AttentionSummary:
        return self.attention.summarize(self._attention_input(y))

    def summarize(self, x: torch.Tensor) -> AttentionSummary:
        return self.summarize_prepared(self.prepare(x))

    def finish(self, y: torch.Tensor, summary: AttentionSummary | None = None) -> torch.Tensor:
        """Class attention (against `summary` of all classes, if given) -> (B, N, C, H, W)."""
        a = self.attention(self._attention_input(y), summary)
        if a.shape[2:4] != y.shape[2:4]:
            b, n, h, w, c = y.shape
            a = a.reshape(b * n, *a.shape[2:]).permute(0, 3, 1, 2)
            a = F.interpolate(a, size=(h, w), mode="bilinear", align_corners=True)
            a = a.permute(0, 2, 3, 1).reshape(b, n, h, w, c)
        return (y + a).permute(0, 1, 4, 2, 3)

    def forward(self, x: torch.Tensor, summary: AttentionSummary | None = None) -> torch.Tensor:
        return self.finish(self.prepare(x), summary)


class CostGuidance(nn.Module):
    """Eq. 2's visual cost volume at one stage, projected by a 1x1 conv from its M template
    channels to the stage's guidance width (SED's 32/16/8), then ReLU — computed without
    materialising the volume: the conv is folded into the prompts,
    sum_m W[k, m] cos(F, P_m) = <F/|F|, sum_m W[k, m] P_m/|P_m|>, so the (B, M, N, H, W) volume
    (5 GB at stride 4 for A-847) never exists."""

    def __init__(self, cost_channels: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, cost_channels))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def from_prompts(self, features: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """features (B, C, H, W), prompts (N, M, C) or (B, N, M, C) -> (B, N, dim, H, W), before ReLU."""
        f = F.normalize(features, dim=1)
        p = F.normalize(prompts.to(f.dtype), dim=-1)
        folded = torch.einsum("km,...nmc->...nkc", self.weight.to(f.dtype), p)
        pattern = "bchw,nkc->bnkhw" if folded.dim() == 3 else "bchw,bnkc->bnkhw"
        return torch.einsum(pattern, f, folded) + self.bias.to(f.dtype).view(1, 1, -1, 1, 1)

    def forward(self, features: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        return F.relu(self.from_prompts(features, prompts))


class UpsampledCostChain(nn.Module):
    """Table 3's upsampled-cost baseline as SED builds it: learned 2x2 stride-2 ConvTranspose +
    ReLU steps over the initial stride-32 cost volume (80 -> 32 -> 16 -> 8 channels), one output
    per decoder stage (strides 16, 8, 4)."""

    def __init__(self, cost_channels: int, dims: tuple[int, ...]):
        super().__init__()
        ins = (cost_channels, *dims[:-1])
        self.steps = nn.ModuleList(nn.ConvTranspose2d(i, o, 2, stride=2) for i, o in zip(ins, dims, strict=False))

    def step(self, k: int, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B*N, C_in, h, w) -> (B*N, dims[k], 2h, 2w), resized to `size` on odd grids."""
        y = F.relu(self.steps[k](x))
        if y.shape[-2:] != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


class StageFusion(nn.Module):
    """SED's up-block tail: a 2x2 deconv of the state to (width - guidance width) channels, then
    two rounds of 3x3 conv (no bias) + GroupNorm + ReLU over concat(state, encoder skip, cost
    guidance) -> `out_dim` channels.

    The first conv is computed as the sum of its slices, so the class-independent skip is
    convolved once per image instead of once per class (the same numbers as convolving the
    broadcast concat; GroupNorm comes after the sum)."""

    def __init__(self, in_dim: int, out_dim: int, skip_dim: int, guidance_dim: int):
        super().__init__()
        up_dim = in_dim - skip_dim
        if up_dim < 1:
            raise ValueError(f"stage width {in_dim} must exceed its guidance width {skip_dim}")
        self.up = nn.ConvTranspose2d(in_dim, up_dim, 2, stride=2)
        self.from_state = nn.Conv2d(up_dim, out_dim, 3, padding=1, bias=False)
        self.from_skip = nn.Conv2d(skip_dim, out_dim, 3, padding=1, bias=False)
        self.from_guidance = nn.Conv2d(guidance_dim, out_dim, 3, padding=1, bias=False) if guidance_dim else None
        self.norm1 = nn.GroupNorm(group_norm_groups(out_dim), out_dim)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(group_norm_groups(out_dim), out_dim)

    def upsample(self, state: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, N, in_dim, h, w) -> (B, N, in_dim - skip_dim, H, W)."""
        b, n = state.shape[:2]
        y = self.up(state.flatten(0, 1))
        if y.shape[-2:] != size:  # odd input sizes: follow the encoder's grid
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y.view(b, n, *y.shape[1:])

    def forward(self, state: torch.Tensor, skip: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """state (B, N, in_dim, h, w) before the deconv, skip (B, skip_dim, H, W), guidance
        (B, N, guidance_dim, H, W) or None -> (B, N, out_dim, H, W)."""
        b, n = state.shape[:2]
        up = self.upsample(state, tuple(skip.shape[-2:]))
        y = self.from_state(up.flatten(0, 1))
        if self.from_guidance is not None:
            if guidance is None:
                raise ValueError("this fusion block was built with cost guidance: pass it")
            y = y + self.from_guidance(guidance.flatten(0, 1))
        y = (y.view(b, n, *y.shape[1:]) + self.from_skip(skip).unsqueeze(1)).flatten(0, 1)
        y = F.relu(self.norm1(y))
        y = F.relu(self.norm2(self.conv2(y)))
        return y.view(b, n, *y.shape[1:])
