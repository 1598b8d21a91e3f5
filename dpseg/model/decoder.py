"""The cost-volume-guided decoder (paper §4.2).

Sized from the encoder's declared channels and strides, never from a table:

  stride 32: initial cost (B, M, N, h, w) --7x7 conv per class--> (B, N, 128, h, w)
  stage k (k = 0, 1, 2; dims 64, 32, 16; guidance strides 16, 8, 4):
     aggregate (HDC conv, norm, GELU MLP, class attention) -> x2 deconv
     -> fuse with the detached encoder skip (C_l / 16 channels) and the visual cost guidance
  head: 3x3 conv -> one logit map per class at stride 4.

Classes can be decoded in chunks: class attention needs only a per-pixel summary over all
classes, so the chunked path first accumulates each stage's summary, then decodes each chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dpseg.model.blocks import AggregationBlock, AttentionSummary, CostGuidance, StageFusion
from dpseg.model.config import DPSegConfig


@dataclass
class DecoderInputs:
    """Everything the decoder needs for one set of classes."""

    cost: torch.Tensor  # initial cost (B, M', N, h, w)
    levels: dict[int, torch.Tensor]  # encoder features by stride
    guidance_prompts: dict[int, torch.Tensor] | None  # stride -> (N|B,N, M, C_l); None: upsampled cost


class CostDecoder(nn.Module):
    def __init__(self, cfg: DPSegConfig, encoder_channels: dict[int, int], cost_channels: int):
        super().__init__()
        self.cfg = cfg
        missing = [s for s in cfg.guidance_strides if s not in encoder_channels]
        if missing:
            raise ValueError(f"encoder has no features at strides {missing}; it has {sorted(encoder_channels)}")
        self.cost_embed = nn.Conv2d(cost_channels, cfg.cost_dim, cfg.cost_kernel, padding=cfg.cost_kernel // 2)
        in_dims = (cfg.cost_dim, *cfg.decoder_dims[:-1])
        guidance_channels = cfg.templates if cfg.visual_guidance == "prompt" else cost_channels
        self.blocks = nn.ModuleList(AggregationBlock(d, cfg.attention_heads, cfg.mlp_ratio) for d in in_dims)
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(d_in, d_out, 2, stride=2) for d_in, d_out in zip(in_dims, cfg.decoder_dims)
        )
        self.skips = nn.ModuleList()
        self.guidance = nn.ModuleList()
        self.fusions = nn.ModuleList()
        for stride, dim in zip(cfg.guidance_strides, cfg.decoder_dims):
            skip_dim = max(1, encoder_channels[stride] // cfg.skip_reduction)
            self.skips.append(nn.Sequential(nn.Conv2d(encoder_channels[stride], skip_dim, 3, padding=1), nn.GELU()))
            self.guidance.append(CostGuidance(guidance_channels, dim))
            self.fusions.append(StageFusion(dim, skip_dim))
        self.head = nn.Conv2d(cfg.decoder_dims[-1], 1, 3, padding=1)

    @property
    def num_stages(self) -> int:
        return len(self.blocks)

    def forward(self, inputs: DecoderInputs, summaries: list[AttentionSummary] | None = None,
                summarize_stage: int | None = None):
        """Logits (B, N, H/4, W/4). With `summaries`, stage k attends over summaries[k] (all
        classes) instead of the classes present; with `summarize_stage`, returns that
        stage's attention summary of these classes instead of logits."""
        cost = inputs.cost
        b, m, n, h, w = cost.shape
        x = self.cost_embed(cost.transpose(1, 2).flatten(0, 1)).view(b, n, -1, h, w)
        for k in range(self.num_stages):
            if summarize_stage == k:
                return self.blocks[k].summarize(x)
            x = self.blocks[k](x, summaries[k] if summaries is not None else None)
            x = self.upsample[k](x.flatten(0, 1))
            x = x.view(b, n, *x.shape[1:])
            stride = self.cfg.guidance_strides[k]
            features = inputs.levels[stride]
            size = tuple(features.shape[-2:])
            if x.shape[-2:] != size:  # odd input sizes: follow the encoder's grid
                x = F.interpolate(x.flatten(0, 1), size=size, mode="bilinear", align_corners=False).view(b, n, -1, *size)
            skip = self.skips[k](features.detach())  # no gradient into the encoder through skips
            if inputs.guidance_prompts is None:
                guidance = self.guidance[k].from_cost(cost, size)
            else:
                guidance = self.guidance[k].from_prompts(features, inputs.guidance_prompts[stride])
            x = self.fusions[k](x, skip, F.gelu(guidance))
        logits = self.head(x.flatten(0, 1))
        return logits.view(b, n, *logits.shape[-2:])
