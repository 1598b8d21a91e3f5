"""The frozen CLIP text tower: class names x templates -> (N, M, D), L2-normalised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpseg.clip.templates import TEMPLATES, split_synonyms


class TextTower(nn.Module):
    def __init__(self, clip_model: nn.Module, tokenizer):
        super().__init__()
        self.clip = clip_model  # open_clip CLIP with its visual tower removed
        self.tokenizer = tokenizer
        self._cache: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}

    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[-1])

    def freeze(self) -> TextTower:
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> TextTower:
        frozen = not any(p.requires_grad for p in self.parameters())
        return super().train(mode and not frozen)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Plain strings -> (len, D) L2-normalised embeddings."""
        device = self.clip.text_projection.device
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start : start + batch_size]).to(device)
            out.append(F.normalize(self.clip.encode_text(tokens).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def encode_classes(self, class_names: list[str], templates: tuple[str, ...] = TEMPLATES) -> torch.Tensor:
        """(N, M, D) float32: per class and template, the mean over the class's synonyms of the
        normalised embeddings, renormalised. Templates are kept apart (one cost channel each).
        Results are cached per (class name, templates) for the tower's lifetime."""
        missing = [n for n in dict.fromkeys(class_names) if (n, templates) not in self._cache]
        if missing:
            texts, owners = [], []
            for i, name in enumerate(missing):
                for synonym in split_synonyms(name):
                    texts.extend(t.format(synonym) for t in templates)
                    owners.append(i)
            embeddings = self.encode_texts(texts).view(len(owners), len(templates), -1)
            owner_index = torch.tensor(owners, device=embeddings.device)
            for i, name in enumerate(missing):
                mean = embeddings[owner_index == i].mean(dim=0)
                self._cache[(name, templates)] = F.normalize(mean, dim=-1).cpu()
        device = self.clip.text_projection.device
        return torch.stack([self._cache[(n, templates)] for n in class_names]).to(device)
