"""Semantic-guided prompt refinement (paper §4.3), as tensor functions: nothing here touches disk.

For one batch after pass I:
    refs = refine_batch(model, images01, detect_maps, settings)   # one Refinement per image
    visual2 = replace_prompts(visual, refs)                        # (B, N, M, ...) per-image prompts
    logits2 = model(text=text, visual=visual2, features=features)  # pass I's features reused

Our reading of what the paper leaves open (docs/eval.md):
- detected: the class owns at least `min_area` pixels of pass I's argmax map at model-input size;
- crop: the bounding box of the class's pixels, cut from the model-input image, pixels outside
  the mask set to the CLIP mean colour (zero after normalisation; `crop="bbox"` keeps them),
  resized to the bank's encode size;
- instances K > 0: the K largest connected components are cropped instead, and the M template
  slots take their features round-robin (slot m <- crop m mod K);
- replace: global embedding and pooled stride-4/8/16 features in all M slots of that class,
  for that image only. Refined features are rounded to float16, the precision overlays store,
  so pass II computed directly and pass II read back from overlays see the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dpseg.clip.image import PROMPT_STRIDES
from dpseg.errors import UserError
from dpseg.model.prompts import VisualPrompts

CROP_MODES = ("masked", "bbox")
DEFAULT_MIN_AREA = 64  # pixels of the model input: 0.4% of a 128x128 demo image, 0.01% at 768


@dataclass(frozen=True)
class RefineSettings:
    encode_size: int  # the bank's prompt encode size: crops are resized to it
    min_area: int = DEFAULT_MIN_AREA
    crop: str = "masked"
    instances: int = 0  # 0: one crop per class; K: the K largest connected components

    def __post_init__(self):
        if self.crop not in CROP_MODES:
            raise UserError(f"crop {self.crop!r} is not one of {', '.join(CROP_MODES)}")
        if self.min_area < 0 or self.instances < 0 or self.encode_size < 8:
            raise UserError(
                f"min_area and instances must be >= 0 and encode_size >= 8 (got {self.min_area}, "
                f"{self.instances}, {self.encode_size})"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Refinement:
    """One image's refined prompts: per detected class (in class order) its area and how many
    crops it has; the crops' features stacked in that order."""

    classes: torch.Tensor  # (C,) int64 indices into the evaluated vocabulary
    areas: torch.Tensor  # (C,) int64 pixels of the detection map
    counts: torch.Tensor  # (C,) int64 crops per class (1, or up to `instances`)
    embedding: torch.Tensor  # (K, D), K = counts.sum()
    pooled: dict[int, torch.Tensor]  # stride -> (K, C_l)


# ---- 1. detect ------------------------------------------------------------------------------
def detect(pred: torch.Tensor, num_classes: int, min_area: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes owning at least max(min_area, 1) pixels of an argmax map (H, W) -> (ids, areas)."""
    areas = torch.bincount(pred.reshape(-1).long().cpu(), minlength=num_classes)[:num_classes]
    ids = torch.nonzero(areas >= max(min_area, 1)).flatten()
    return ids, areas[ids]


# ---- 2. crop --------------------------------------------------------------------------------
def crop_masked(image: torch.Tensor, mask: torch.Tensor, size: int, fill: torch.Tensor | None) -> torch.Tensor:
    """The bounding box of `mask` (H, W) cut from `image` (3, H, W), pixels outside the mask set
    to `fill` (3,) when given, resized to (3, size, size)."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError("empty mask")
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = image[:, top:bottom, left:right]
    if fill is not None:
        crop = torch.where(mask[top:bottom, left:right].unsqueeze(0), crop, fill.view(3, 1, 1).to(crop))
    return F.interpolate(
        crop.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False, antialias=True
    ).squeeze(0)


def largest_components(mask: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The k largest 8-connected components of a boolean mask, largest first (ties: by label order)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask.cpu().numpy(), structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")[:k]
    labels_t = torch.from_numpy(labels).to(mask.device)
    return [labels_t == int(i) + 1 for i in order]


def image_crops(
    image: torch.Tensor, pred: torch.Tensor, classes: torch.Tensor, settings: RefineSettings, fill: torch.Tensor
) -> tuple[list[torch.Tensor], list[int]]:
    """Crops (each (3, S, S)) of the detected `classes` of one image, and the count per class."""
    crops, counts = [], []
    use_fill = fill if settings.crop == "masked" else None
    for c in classes.tolist():
        mask = pred == c
        masks = largest_components(mask, settings.instances) if settings.instances else [mask]
        crops.extend(crop_masked(image, m, settings.encode_size, use_fill) for m in masks)
        counts.append(len(masks))
    return crops, counts


# ---- 3. encode every crop of the batch in one call of the frozen prompt tower -----------------
@torch.no_grad()
def refine_batch(model, images: torch.Tensor, preds: torch.Tensor, settings: RefineSettings) -> list[Refinement]:
    """`images` (B, 3, H, W) RGB in [0, 1] (the model input, before CLIP normalisation) and
    `preds` (B, H, W) pass I's argmax at the same size -> one Refinement per image."""
    tower = model.prompt_encoder
    fill = tower.mean.view(3).to(images)  # the CLIP mean colour: zero once normalised
    num_classes = int(preds.max()) + 1 if preds.numel() else 0
    per_image = []
    all_crops: list[torch.Tensor] = []
    for image, pred in zip(images, preds, strict=True):
        classes, areas = detect(pred, num_classes, settings.min_area)
        crops, counts = image_crops(image, pred, classes.to(pred.device), settings, fill)
        per_image.append((classes, areas, torch.tensor(counts, dtype=torch.int64)))
        all_crops.extend(crops)
    if all_crops:
        out = tower.encode_prompts(tower.normalize(torch.stack(all_crops)), PROMPT_STRIDES)
        # the precision overlays keep, so a re-read overlay reproduces pass II exactly
        embedding = out.embedding.half().float().cpu()
        pooled = {s: out.pooled[s].half().float().cpu() for s in PROMPT_STRIDES}
    refs, start = [], 0
    for classes, areas, counts in per_image:
        k = int(counts.sum())
        if k:
            emb = embedding[start : start + k]
            pool = {s: p[start : start + k] for s, p in pooled.items()}
        else:
            emb = torch.zeros(0, tower.embed_dim)
            pool = {s: torch.zeros(0, tower.channels_at(s)) for s in PROMPT_STRIDES}
        refs.append(Refinement(classes.long(), areas.long(), counts, emb, pool))
        start += k
    return refs


# ---- 4. replace -----------------------------------------------------------------------------
def slot_indices(counts: torch.Tensor, templates: int) -> torch.Tensor:
    """(C, M) row of the stacked crop features each template slot of each class takes:
    crop m mod K_c of that class (round-robin)."""
    starts = torch.cumsum(counts, 0) - counts
    m = torch.arange(templates)
    return starts.unsqueeze(1) + m.unsqueeze(0) % counts.clamp(min=1).unsqueeze(1)


def replace_prompts(visual: VisualPrompts, refs: list[Refinement]) -> VisualPrompts:
    """Per-image prompts (B, N, M, ...): the bank's, with all M slots of each image's detected
    classes replaced by that image's crop features. Text prompts are not involved."""
    out = visual.per_image(len(refs))
    templates = out.num_templates
    for b, ref in enumerate(refs):
        if ref.classes.numel() == 0:
            continue
        if int(ref.classes.max()) >= out.num_classes:
            raise ValueError(f"refinement names class {int(ref.classes.max())}, prompts have {out.num_classes}")
        rows = slot_indices(ref.counts, templates)  # (C, M)
        cls = ref.classes.to(out.embedding.device)
        out.embedding[b, cls] = ref.embedding[rows].to(out.embedding)
        for s in out.pooled:
            out.pooled[s][b, cls] = ref.pooled[s][rows].to(out.pooled[s])
    return out
