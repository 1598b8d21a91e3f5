"""Decoder building blocks. Tensors between blocks are (B, N, C, H, W): batch, classes,
channels, space. Every block treats classes alike (no class order), as open vocabularies need."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpseg.precision import fp32, kept_dtype

AttentionSummary = tuple[torch.Tensor, torch.Tensor]  # (sum_n k v^T, sum_n k) per pixel and head


def group_norm_groups(channels: int) -> int:
    """SED's DoubleConv: one GroupNorm group per 16 channels (at least one)."""
    return max(1, channels // 16)


class HybridDilatedConv(nn.Module):
    """Three 3x3 convs with dilations 1, 2, 4, summed: a wide receptive field without gridding.
    Depthwise by default: it takes the place of the depthwise conv in SED's spatial ConvNeXt
    block, whose MLP mixes the channels."""

    def __init__(self, dim: int, dilations: tuple[int, ...] = (1, 2, 4), depthwise: bool = True):
        super().__init__()
        groups = dim if depthwise else 1
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=d, dilation=d, groups=groups) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.convs)


class SpatialBlock(nn.Module):
    """Paper §4.2's HDC -> norm -> GELU MLP, laid out as SED's spatial ConvNeXt block (the paper
    does not say where the residual goes): x + gamma * MLP(LN(HDC(x))), one learned layer-scale
    gamma per channel (SED builds it with initial value 1.0)."""

    def __init__(self, dim: int, mlp_ratio: int, depthwise: bool = True, layer_scale_init: float = 1.0):
        super().__init__()
        self.hdc = HybridDilatedConv(dim, depthwise=depthwise)
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # SED's ConvNeXt LayerNorm eps
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B', C, H, W) -> (B', H, W, C) channels-last, as the class block wants it."""
        y = self.hdc(x).permute(0, 2, 3, 1)
        return x.permute(0, 2, 3, 1) + self.gamma * self.mlp(self.norm(y))


class ClassAttention(nn.Module):
    """Self-attention across categories at every pixel, in linear (kernelised, elu+1) form as SED.
    Like SED's AttentionLayer: q, k, v projections (one fused linear, the same function) and no
    output projection.

    The linear form's keys and values reduce to a per-pixel summary (sum over classes), so
    classes can be decoded in chunks against a summary of *all* classes and give the one-pass
    result exactly. The summary and the normalisation run in fp32 whatever the autocast.
    """

    def __init__(self, dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.eps = dim, heads, eps
        self.qkv = nn.Linear(dim, 3 * dim)

    def _qkv(self, x: torch.Tensor):
        """x (B, N, H, W, C) -> q, k, v (B, N, H, W, heads, C/heads); q, k positive (elu + 1)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(-3)
        return F.elu(q) + 1, F.elu(k) + 1, v

    @staticmethod
    def summary_of(k: torch.Tensor, v: torch.Tensor) -> AttentionSummary:
        with fp32(k):  # sums over hundreds of classes: never in half precision
            k, v = k.float(), v.float()
            return torch.einsum("bnxyhd,bnxyhe->bxyhde", k, v), k.sum(dim=1)

    def _part(self, x: torch.Tensor, parts: slice) -> torch.Tensor:
        """Rows `parts` (in thirds: q, k, v) of the qkv projection, so chunked decoding computes
        k, v for the summary and q for the output once each, as the one-pass path does."""
        rows = slice(parts.start * self.dim, parts.stop * self.dim)
        out = F.linear(x, self.qkv.weight[rows], self.qkv.bias[rows])
        return out.unflatten(-1, (parts.stop - parts.start, self.heads, -1))

    def summarize(self, x: torch.Tensor, record: list | None = None) -> AttentionSummary:
        """These classes' summary; `record` receives (summary, keys, values)."""
        k, v = self._part(x, slice(1, 3)).unbind(-3)
        k = F.elu(k) + 1
        summary = self.summary_of(k, v)
        if record is not None:
            record.append((summary, k, v))
        return summary

    def forward(
        self,
        x: torch.Tensor,
        summary: AttentionSummary | None = None,
        add_own: bool = False,
        record: list | None = None,
    ) -> torch.Tensor:
        """Attention of every class against `summary` (default: these classes' own; with `add_own`,
        `summary` plus these classes' own). `record` receives (the summary used, these classes'
        keys, values), the keys and values None where only the queries were computed: what a
        `PassContext` keeps of a decode."""
        k = v = None
        if summary is None or add_own:
            q, k, v = self._qkv(x)
            own = self.summary_of(k, v)
            summary = own if summary is None else (summary[0] + own[0], summary[1] + own[1])
        else:
            q = F.elu(self._part(x, slice(0, 1)).squeeze(-3)) + 1
        if record is not None:
            record.append((summary, k, v))
        kv, k_sum = summary
        with fp32(q):
            q = q.float()
            numerator = torch.einsum("bnxyhd,bxyhde->bnxyhe", q, kv)
            denominator = torch.einsum("bnxyhd,bxyhd->bnxyh", q, k_sum).unsqueeze(-1)
            out = numerator / (denominator + self.eps)
        return out.to(x.dtype).flatten(-2)


class AggregationBlock(nn.Module):
    """One decoder stage's aggregation: the spatial block (paper: HDC -> norm -> GELU MLP; SED's
    layer-scaled residual), then the class block, laid out as SED's class transformer layer: on a
    grid average-pooled by `pool_train` in training and `pool_eval` at evaluation (SED: 2x2 and
    1x1), p + Attn(LN(p)) then (with `class_mlp`) p + MLP_ReLU(LN(p)); the result is upsampled
    back bilinearly (align_corners=True) and added to the un-pooled input, as SED does."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: int,
        depthwise: bool = True,
        pool_train: int = 2,
        pool_eval: int = 1,
        layer_scale_init: float = 1.0,
        class_mlp: bool = True,
    ):
        super().__init__()
        self.spatial = SpatialBlock(dim, mlp_ratio, depthwise, layer_scale_init)
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = ClassAttention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim) if class_mlp else None
        self.mlp = (
            nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.ReLU(), nn.Linear(dim * mlp_ratio, dim))
            if class_mlp
            else None
        )
        self.pool_train, self.pool_eval = pool_train, pool_eval

    @property
    def pool(self) -> int:
        return self.pool_train if self.training else self.pool_eval

    def _pooled(self, y: torch.Tensor) -> torch.Tensor:
        """Channels-last (B, N, H, W, C) -> the class block's grid (B, N, h, w, C)."""
        if self.pool > 1:
            b, n, h, w, c = y.shape
            pooled = F.avg_pool2d(y.reshape(b * n, h, w, c).permute(0, 3, 1, 2), self.pool, ceil_mode=True)
            y = pooled.permute(0, 2, 3, 1).reshape(b, n, *pooled.shape[-2:], c)
        return y

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial block: (B, N, C, H, W) -> channels-last (B, N, H, W, C)."""
        b, n, c, h, w = x.shape
        return self.spatial(x.flatten(0, 1)).view(b, n, h, w, c)

    def summarize_prepared(self, y: torch.Tensor, record: list | None = None) -> AttentionSummary:
        return self.attention.summarize(self.attention_norm(self._pooled(y)), record)

    def summarize(self, x: torch.Tensor) -> AttentionSummary:
        return self.summarize_prepared(self.prepare(x))

    def finish(
        self,
        y: torch.Tensor,
        summary: AttentionSummary | None = None,
        add_own: bool = False,
        record: list | None = None,
    ) -> torch.Tensor:
        """The class block (attention against `summary` of all classes, if given, plus these
        classes' own with `add_own`; `record` as `ClassAttention.forward`) -> (B, N, C, H, W)."""
        p = self._pooled(y)
        p = p + self.attention(self.attention_norm(p), summary, add_own, record)
        if self.mlp is not None:
            p = p + self.mlp(self.mlp_norm(p))
        if p.shape[2:4] != y.shape[2:4]:
            b, n, h, w, c = y.shape
            p = p.reshape(b * n, *p.shape[2:]).permute(0, 3, 1, 2)
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=True)
            p = p.permute(0, 2, 3, 1).reshape(b, n, h, w, c)
        return (y + p).permute(0, 1, 4, 2, 3)

    def forward(
        self,
        x: torch.Tensor,
        summary: AttentionSummary | None = None,
        add_own: bool = False,
        record: list | None = None,
    ) -> torch.Tensor:
        return self.finish(self.prepare(x), summary, add_own, record)


class CostGuidance(nn.Module):
    """Eq. 2's visual cost volume at one stage, projected by a 1x1 conv from its M template
    channels to the stage's guidance width (SED's 32/16/8), then ReLU — computed without
    materialising the volume: the conv is folded into the prompts,
    sum_m W[k, m] cos(F, P_m) = <F/|F|, sum_m W[k, m] P_m/|P_m|>, so the (B, M, N, H, W) volume
    (5 GB at stride 4 for A-847) never exists.

    With `crop_weights`, slots marked as holding a crop of the image take a second weight matrix
    (crop_channels): the volume's bank share and crop share are projected apart."""

    def __init__(self, cost_channels: int, dim: int, crop_weights: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, cost_channels))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.crop_weight = nn.Parameter(torch.empty(dim, cost_channels)) if crop_weights else None
        if self.crop_weight is not None:
            nn.init.kaiming_uniform_(self.crop_weight, a=5**0.5)

    def from_prompts(
        self, features: torch.Tensor, prompts: torch.Tensor, crops: torch.Tensor | None = None
    ) -> torch.Tensor:
        """features (B, C, H, W), prompts (N, M, C) or (B, N, M, C), crops (B, N, M) marks or
        None -> (B, N, dim, H, W), before ReLU."""
        dtype = kept_dtype(features)
        with fp32(features):  # a cost volume: fp32 whatever the autocast (as cosine_cost)
            f = F.normalize(features.float(), dim=1)
            p = F.normalize(prompts.to(device=f.device, dtype=torch.float32), dim=-1)
            if self.crop_weight is None or crops is None:
                folded = torch.einsum("km,...nmc->...nkc", self.weight.float(), p)
            else:
                marks = crops.to(device=f.device, dtype=torch.float32)[..., None]  # (B, N, M, 1)
                folded = torch.einsum("km,...nmc->...nkc", self.weight.float(), p * (1 - marks)) + torch.einsum(
                    "km,...nmc->...nkc", self.crop_weight.float(), p * marks
                )
            pattern = "bchw,nkc->bnkhw" if folded.dim() == 3 else "bchw,bnkc->bnkhw"
            out = torch.einsum(pattern, f, folded) + self.bias.float().view(1, 1, -1, 1, 1)
        return out.to(dtype)

    def forward(self, features: torch.Tensor, prompts: torch.Tensor, crops: torch.Tensor | None = None) -> torch.Tensor:
        return F.relu(self.from_prompts(features, prompts, crops))


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
