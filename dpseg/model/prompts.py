"""Prompt tensors the model consumes: text (N, M, D) and visual prompts (global + per level).

Visual prompts may carry a batch dimension (B, N, M, ...) — pass II gives every image its own
prompts for the classes it detected."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisualPrompts:
    embedding: torch.Tensor  # (N, M, D) or (B, N, M, D)
    pooled: dict[int, torch.Tensor]  # stride -> (N, M, C_l) or (B, N, M, C_l)

    @property
    def num_classes(self) -> int:
        return self.embedding.shape[-3]

    @property
    def num_templates(self) -> int:
        return self.embedding.shape[-2]

    @property
    def batched(self) -> bool:
        return self.embedding.dim() == 4

    def select(self, classes: slice) -> VisualPrompts:
        return VisualPrompts(
            self.embedding[..., classes, :, :],
            {s: p[..., classes, :, :] for s, p in self.pooled.items()},
        )

    def to(self, *args, **kwargs) -> VisualPrompts:
        pooled = {s: p.to(*args, **kwargs) for s, p in self.pooled.items()}
        return VisualPrompts(self.embedding.to(*args, **kwargs), pooled)

    def per_image(self, batch_size: int) -> VisualPrompts:
        """Batched copy (B, N, M, ...) so single images' prompts can be replaced (pass II)."""
        if self.batched:
            return VisualPrompts(self.embedding.clone(), {s: p.clone() for s, p in self.pooled.items()})
        expand = lambda t: t.unsqueeze(0).expand(batch_size, *t.shape).clone()  # noqa: E731
        return VisualPrompts(expand(self.embedding), {s: expand(p) for s, p in self.pooled.items()})
