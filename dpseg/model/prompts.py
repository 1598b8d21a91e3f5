"""Prompt tensors the model consumes: text (N, M, D) and visual prompts (global + per level).

Visual prompts may carry a batch dimension (B, N, M, ...) — pass II gives every image its own
prompts for the classes it detected — and then mark which slots hold the image's own crop
(`crops`, read by models built with crop_channels)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisualPrompts:
    embedding: torch.Tensor  # (N, M, D) or (B, N, M, D)
    pooled: dict[int, torch.Tensor]  # stride -> (N, M, C_l) or (B, N, M, C_l)
    crops: torch.Tensor | None = None  # (B, N, M) bool: slots holding a crop of the image; None: none do

    @property
    def num_classes(self) -> int:
        return self.embedding.shape[-3]

    @property
    def num_templates(self) -> int:
        return self.embedding.shape[-2]

    @property
    def batched(self) -> bool:
        return self.embedding.dim() == 4

    def prototypes(self) -> torch.Tensor:
        """(..., N, D): each class's unit mean of its M unit global embeddings."""
        unit = torch.nn.functional.normalize(self.embedding.float(), dim=-1)
        return torch.nn.functional.normalize(unit.mean(dim=-2), dim=-1)

    def select(self, classes: slice) -> VisualPrompts:
        return VisualPrompts(
            self.embedding[..., classes, :, :],
            {s: p[..., classes, :, :] for s, p in self.pooled.items()},
            None if self.crops is None else self.crops[:, classes],
        )

    def to(self, *args, **kwargs) -> VisualPrompts:
        embedding = self.embedding.to(*args, **kwargs)
        pooled = {s: p.to(*args, **kwargs) for s, p in self.pooled.items()}
        crops = None if self.crops is None else self.crops.to(embedding.device)
        return VisualPrompts(embedding, pooled, crops)

    def per_image(self, batch_size: int) -> VisualPrompts:
        """Batched copy (B, N, M, ...) so single images' prompts can be replaced (pass II), with
        its crop marks (all False where none were set)."""
        if self.batched:
            crops = self.crops.clone() if self.crops is not None else None
            out = VisualPrompts(self.embedding.clone(), {s: p.clone() for s, p in self.pooled.items()}, crops)
        else:
            expand = lambda t: t.unsqueeze(0).expand(batch_size, *t.shape).clone()  # noqa: E731
            out = VisualPrompts(expand(self.embedding), {s: expand(p) for s, p in self.pooled.items()})
        if out.crops is None:
            out.crops = torch.zeros(out.embedding.shape[:-1], dtype=torch.bool, device=out.embedding.device)
        return out
