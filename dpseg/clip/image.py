"""The CLIP image tower (an open_clip timm tower: ConvNeXt for the paper, a ResNet for `tiny`) as a
multi-scale encoder.

Exposes what the decoder sizes itself from (timm's feature info: channels and strides), the
dense stride-32 embedding (the tower's head applied at every location) and the pooled
embedding, which is exactly open_clip's `encode_image`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

PROMPT_STRIDES = (4, 8, 16)  # levels whose pooled features are visual prompts (paper §4.2)


@dataclass
class ImageFeatures:
    """What the image tower gives the decoder: per-stage maps and the dense embedding.
    Pass II of evaluation reuses these instead of re-running the tower."""

    levels: dict[int, torch.Tensor]  # stride -> (B, C_l, H/l, W/l)
    dense: torch.Tensor  # (B, D, H/32, W/32)

    def detach(self) -> ImageFeatures:
        return ImageFeatures({s: f.detach() for s, f in self.levels.items()}, self.dense.detach())


@dataclass
class PromptFeatures:
    """Visual-prompt features of a batch of prompt images."""

    embedding: torch.Tensor  # (B, D), equal to open_clip encode_image
    pooled: dict[int, torch.Tensor]  # stride -> (B, C_l), spatial mean of that stage


class ImageTower(nn.Module):
    def __init__(self, visual: nn.Module, image_size: int):
        super().__init__()
        if not hasattr(visual, "trunk") or not hasattr(visual.trunk, "feature_info"):
            raise TypeError("ImageTower needs an open_clip timm tower (a ConvNeXt or ResNet CLIP)")
        self.visual = visual
        self.image_size = image_size
        info = visual.trunk.feature_info
        self.strides: list[int] = [int(f["reduction"]) for f in info]
        self.channels: list[int] = [int(f["num_chs"]) for f in info]
        self.embed_dim: int = int(self._embed_dim(visual))
        device = next(visual.parameters()).device
        mean = torch.tensor(OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        std = torch.tensor(OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)
        self.register_buffer("std", std, persistent=False)
        self._freeze_batchnorm()

    @staticmethod
    def _embed_dim(visual: nn.Module) -> int:
        last = [m for m in visual.head.modules() if isinstance(m, nn.Linear)][-1]
        return last.out_features

    def channels_at(self, stride: int) -> int:
        return self.channels[self.strides.index(stride)]

    def freeze(self) -> ImageTower:
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> ImageTower:
        # a frozen tower stays in eval mode whatever its parent does (no drop-path noise)
        frozen = not any(p.requires_grad for p in self.parameters())
        super().train(mode and not frozen)
        return self._freeze_batchnorm()

    def _freeze_batchnorm(self) -> ImageTower:
        # BatchNorm statistics stay those of pretraining (frozen BN, as detection codebases keep
        # it): batches of a few crops would otherwise overwrite them while the weights barely move
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def set_regularization(self, drop_path: float, head_dropout: float) -> ImageTower:
        """Stochastic depth over the trunk's blocks (rising linearly from 0 to `drop_path`, timm's
        rule) and dropout before the head's projection, set explicitly so a training recipe never
        inherits whatever the installed open_clip's model config says."""
        from timm.layers import DropPath

        # ConvNeXt blocks hold an Identity or DropPath; timm's ResNet blocks hold None when off
        blocks = [
            m
            for m in self.visual.trunk.modules()
            if hasattr(m, "drop_path")
            and isinstance(m, nn.Module)
            and (m.drop_path is None or isinstance(m.drop_path, (nn.Identity, DropPath)))
        ]
        rates = [drop_path * i / max(1, len(blocks) - 1) for i in range(len(blocks))]  # no tensors: works under meta
        for block, rate in zip(blocks, rates, strict=False):
            block.drop_path = DropPath(rate) if rate > 0 else nn.Identity()
        for name, module in self.visual.head.named_modules():
            # open_clip: head.drop before a linear projection; head.mlp.drop1 inside an MLP projection
            if isinstance(module, nn.Dropout) and name in ("drop", "mlp.drop1"):
                module.p = head_dropout
        return self

    def regularization(self) -> dict[str, float]:
        """The drop-path rate of the last block and the head dropout now in effect."""
        from timm.layers import DropPath

        rates = [
            m.drop_path.drop_prob
            for m in self.visual.trunk.modules()
            if isinstance(getattr(m, "drop_path", None), DropPath)
        ]
        drops = [
            m.p for n, m in self.visual.head.named_modules() if isinstance(m, nn.Dropout) and n in ("drop", "mlp.drop1")
        ]
        return {"drop_path": max(rates, default=0.0), "head_dropout": max(drops, default=0.0)}

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> CLIP-normalised input."""
        mean, std = self.mean.to(images.device, images.dtype), self.std.to(images.device, images.dtype)
        return (images - mean) / std

    def resize(self, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
        size = size or self.image_size
        if images.shape[-2:] == (size, size):
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        """Normalised images (B, 3, H, W), H and W multiples of 32 -> ImageFeatures."""
        maps = self.visual.trunk.forward_intermediates(images, intermediates_only=True)
        levels = dict(zip(self.strides, maps, strict=False))
        return ImageFeatures(levels=levels, dense=self.dense_embedding(levels[self.strides[-1]]))

    def dense_embedding(self, last_stage: torch.Tensor) -> torch.Tensor:
        """The head (norm + projection) at every stride-32 location -> (B, D, h, w)."""
        head = getattr(self.visual.trunk, "head", None)  # ConvNeXt normalises before pooling; ResNet has no norm
        x = head.norm(last_stage) if head is not None and hasattr(head, "norm") else last_stage
        x = self.visual.head(x.permute(0, 2, 3, 1))
        return x.permute(0, 3, 1, 2)

    def pooled_embedding(self, last_stage: torch.Tensor) -> torch.Tensor:
        """Global embedding (B, D): the trunk's own pooling head, then the CLIP projection."""
        return self.visual.head(self.visual.trunk.forward_head(last_stage))

    def encode_prompts(self, images: torch.Tensor, strides: tuple[int, ...] = PROMPT_STRIDES) -> PromptFeatures:
        """Normalised prompt images -> global embedding and spatially averaged stage features."""
        maps = self.visual.trunk.forward_intermediates(images, intermediates_only=True)
        levels = dict(zip(self.strides, maps, strict=False))
        pooled = {s: levels[s].float().mean(dim=(2, 3)).to(levels[s].dtype) for s in strides}
        return PromptFeatures(embedding=self.pooled_embedding(levels[self.strides[-1]]), pooled=pooled)
