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

Variants (each a RefineSettings field; the defaults above are the paper's reading):
- confidence / margin: crop only the class's pixels whose pass-I probability (or top-1 minus
  top-2 probability) clears the threshold; erode: shrink the mask by that many pixels first.
  A class left with no pixel keeps its bank prompts.
- gate: refine a class only when its mean pass-I probability over its pixels clears the gate.
- merge: replace (all M slots) | mix (a `share` of the M slots, spread evenly, the rest keep
  the bank's) | blend (every slot = (1 - share) bank + share crop, on unit vectors) | add (the
  crop prompts decoded as an extra copy of the class, whose score is the max of the two:
  `add_classes` / `merge_added`).
- fit: each crop encoded at the smallest multiple of 32 holding its box (at most encode_size)
  instead of always at encode_size.
- Ground-truth crops (the oracle diagnostic; training with crop prompts) use the same
  functions with the label map in place of pass I's argmax (`label_maps`).
Fast pass II: `top_classes` / `select_classes` / `scatter_classes` decode pass II for each
image's k best pass-I classes only and keep pass I's logits for the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from dpseg.clip.image import PROMPT_STRIDES
from dpseg.errors import UserError
from dpseg.model.prompts import VisualPrompts

CROP_MODES = ("masked", "bbox")
MERGES = ("replace", "mix", "blend", "add")
PAPER_MERGE = ("replace", 1.0)  # §4.3: every slot of a detected class takes its crop
DEFAULT_MIN_AREA = 64  # pixels of the model input: 0.4% of a 128x128 demo image, 0.01% at 768
FIT_STEP = 32  # `fit` encode sizes are multiples of the towers' stride


@dataclass(frozen=True)
class RefineSettings:
    encode_size: int  # the bank's prompt encode size: crops are resized to it
    min_area: int = DEFAULT_MIN_AREA
    crop: str = "masked"
    instances: int = 0  # 0: one crop per class; K: the K largest connected components
    confidence: float = 0.0  # crop only pixels whose pass-I probability is at least this
    margin: float = 0.0  # ... and whose top-1 minus top-2 probability is at least this
    erode: int = 0  # pixels the class mask shrinks by (3x3 erosion) before cropping
    gate: float = 0.0  # refine a class only if its mean pass-I probability reaches this
    merge: str = "replace"
    share: float = 1.0  # mix: share of the M slots taking crops; blend: the crops' weight
    fit: bool = False  # encode each crop at the smallest multiple of 32 holding its box

    def __post_init__(self):
        if self.crop not in CROP_MODES:
            raise UserError(f"crop {self.crop!r} is not one of {', '.join(CROP_MODES)}")
        if self.merge not in MERGES:
            raise UserError(f"merge {self.merge!r} is not one of {', '.join(MERGES)}")
        if self.min_area < 0 or self.instances < 0 or self.erode < 0 or self.encode_size < 8:
            raise UserError(
                f"min_area, instances and erode must be >= 0 and encode_size >= 8 (got {self.min_area}, "
                f"{self.instances}, {self.erode}, {self.encode_size})"
            )
        for name in ("confidence", "margin", "gate", "share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.merge in ("mix", "blend") and self.share == 0:
            raise UserError(f"merge {self.merge} with share 0 changes nothing; give a share in (0, 1]")

    @property
    def uses_confidence(self) -> bool:
        return self.confidence > 0 or self.margin > 0 or self.gate > 0

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
def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a non-empty boolean mask, bottom/right exclusive."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError("empty mask")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def fit_size(mask: torch.Tensor, encode_size: int) -> int:
    """The smallest multiple of 32 (at least 32) holding the mask's box, at most `encode_size`."""
    top, bottom, left, right = mask_box(mask)
    side = max(bottom - top, right - left)
    return min(encode_size, max(FIT_STEP, -(-side // FIT_STEP) * FIT_STEP))


def crop_masked(image: torch.Tensor, mask: torch.Tensor, size: int, fill: torch.Tensor | None) -> torch.Tensor:
    """The bounding box of `mask` (H, W) cut from `image` (3, H, W), pixels outside the mask set
    to `fill` (3,) when given, resized to (3, size, size)."""
    top, bottom, left, right = mask_box(mask)
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


def erode_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """`mask` shrunk by `pixels` steps of a 3x3 erosion (the image border counts as outside)."""
    if pixels <= 0:
        return mask
    x = mask.float()[None, None]
    for _ in range(pixels):
        x = -F.max_pool2d(-F.pad(x, (1, 1, 1, 1), value=0.0), 3, stride=1)
    return x[0, 0] > 0.5


def class_mask(
    pred: torch.Tensor, c: int, settings: RefineSettings, confidence: torch.Tensor | None
) -> torch.Tensor | None:
    """The pixels of class `c` a crop is cut from: pred == c, thinned by the confidence, margin
    and erosion settings; None when the gate refuses the class or nothing is left."""
    mask = pred == c
    if confidence is not None and settings.uses_confidence:
        top1, top2 = confidence[0], confidence[1]
        if settings.gate > 0 and float(top1[mask].mean()) < settings.gate:
            return None
        if settings.confidence > 0:
            mask = mask & (top1 >= settings.confidence)
        if settings.margin > 0:
            mask = mask & (top1 - top2 >= settings.margin)
    mask = erode_mask(mask, settings.erode)
    return mask if bool(mask.any()) else None


def image_crops(
    image: torch.Tensor,
    pred: torch.Tensor,
    classes: torch.Tensor,
    settings: RefineSettings,
    fill: torch.Tensor,
    confidence: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """Crops (each (3, S, S), S = encode_size or its `fit` size) of one image's detected
    `classes`, the crop count per class and the classes that got crops (in order)."""
    crops, counts, kept = [], [], []
    use_fill = fill if settings.crop == "masked" else None
    for c in classes.tolist():
        mask = class_mask(pred, c, settings, confidence)
        if mask is None:
            continue
        masks = largest_components(mask, settings.instances) if settings.instances else [mask]
        for m in masks:
            size = fit_size(m, settings.encode_size) if settings.fit else settings.encode_size
            crops.append(crop_masked(image, m, size, use_fill))
        counts.append(len(masks))
        kept.append(c)
    return crops, counts, kept


def label_maps(labels: torch.Tensor, num_classes: int, ignore_index: int, size: tuple[int, int]) -> torch.Tensor:
    """Ground-truth label maps (B, h, w) as detection maps (B, H, W) for ground-truth crops:
    nearest-resized to the model input, ignored pixels set to `num_classes` (never detected)."""
    labels = labels.long()
    labels = torch.where((labels < 0) | (labels >= num_classes) | (labels == ignore_index), num_classes, labels)
    if tuple(labels.shape[-2:]) != tuple(size):
        labels = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
    return labels


def pass1_confidence(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 2, H, W): the top-1 and top-2 sigmoid probabilities of pass I's logits upsampled to
    `size` as SED's post-processing does (the top-1 is the argmax class's probability)."""
    probs = torch.sigmoid(logits.float())
    up = F.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)
    if up.shape[1] == 1:
        return torch.cat([up, torch.zeros_like(up)], dim=1)
    return up.topk(2, dim=1).values


def _encode(tower, crops: list[torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """All crops through the prompt tower, one call per crop size, rows in input order."""
    sizes = sorted({int(c.shape[-1]) for c in crops})
    embedding = pooled = None
    for size in sizes:
        rows = [i for i, c in enumerate(crops) if int(c.shape[-1]) == size]
        batch = tower.normalize(torch.stack([crops[i] for i in rows]))
        if batch.device.type == "cpu":  # oneDNN's convolutions run faster channels-last (same values to ~1e-7)
            batch = batch.contiguous(memory_format=torch.channels_last)
        out = tower.encode_prompts(batch, PROMPT_STRIDES)
        if embedding is None:
            embedding = out.embedding.new_zeros(len(crops), out.embedding.shape[-1])
            pooled = {s: out.pooled[s].new_zeros(len(crops), out.pooled[s].shape[-1]) for s in PROMPT_STRIDES}
        index = torch.tensor(rows, device=out.embedding.device)
        embedding[index] = out.embedding
        for s in PROMPT_STRIDES:
            pooled[s][index] = out.pooled[s]
    return embedding, pooled


# ---- 3. encode every crop of the batch in one call of the frozen prompt tower -----------------
@torch.no_grad()
def refine_batch(
    model,
    images: torch.Tensor,
    preds: torch.Tensor,
    settings: RefineSettings,
    confidence: torch.Tensor | None = None,
    num_classes: int | None = None,
) -> list[Refinement]:
    """`images` (B, 3, H, W) RGB in [0, 1] (the model input, before CLIP normalisation) and
    `preds` (B, H, W) pass I's argmax at the same size -> one Refinement per image.
    `confidence` (B, 2, H, W) from `pass1_confidence` is needed by the confidence, margin and
    gate settings; `num_classes` (default: preds.max() + 1) bounds the detected ids, so a
    label map with an out-of-vocabulary value for ignored pixels can stand in for pass I."""
    tower = model.prompt_encoder
    fill = tower.mean.view(3).to(images)  # the CLIP mean colour: zero once normalised
    if num_classes is None:
        num_classes = int(preds.max()) + 1 if preds.numel() else 0
    if settings.uses_confidence and confidence is None:
        raise ValueError("confidence, margin and gate need pass I's confidence maps")
    per_image = []
    all_crops: list[torch.Tensor] = []
    for b, (image, pred) in enumerate(zip(images, preds, strict=True)):
        classes, areas = detect(pred, num_classes, settings.min_area)
        conf = confidence[b] if confidence is not None else None
        crops, counts, kept = image_crops(image, pred, classes.to(pred.device), settings, fill, conf)
        keep = torch.tensor([c in set(kept) for c in classes.tolist()], dtype=torch.bool)
        per_image.append((classes[keep], areas[keep], torch.tensor(counts, dtype=torch.int64)))
        all_crops.extend(crops)
    if all_crops:
        out_embedding, out_pooled = _encode(tower, all_crops)
        # the precision overlays keep, so a re-read overlay reproduces pass II exactly
        embedding = out_embedding.half().float().cpu()
        pooled = {s: out_pooled[s].half().float().cpu() for s in PROMPT_STRIDES}
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


def mixed_slots(templates: int, share: float) -> torch.Tensor:
    """(M,) bool: which template slots `mix` gives to crops, max(1, round(share * M)) of them
    spread evenly (slot m when floor((m + 1) * share') passes an integer, share' = count / M)."""
    count = max(1, min(templates, round(share * templates)))
    m = torch.arange(templates)
    return (m + 1) * count // templates > m * count // templates


def replace_prompts(
    visual: VisualPrompts, refs: list[Refinement], merge: str = "replace", share: float = 1.0
) -> VisualPrompts:
    """Per-image prompts (B, N, M, ...): the bank's, with each image's detected classes given
    that image's crop features in all M slots (`replace`), in a share of them (`mix`), or
    blended into all of them (`blend`). Text prompts are not involved (`add`: see add_classes)."""
    if merge not in ("replace", "mix", "blend"):
        raise ValueError(f"replace_prompts merges by replace, mix or blend, not {merge!r}")
    out = visual.per_image(len(refs))
    templates = out.num_templates
    slots = mixed_slots(templates, share) if merge == "mix" else torch.ones(templates, dtype=torch.bool)
    slots = slots.to(out.embedding.device)
    for b, ref in enumerate(refs):
        if ref.classes.numel() == 0:
            continue
        if int(ref.classes.max()) >= out.num_classes:
            raise ValueError(f"refinement names class {int(ref.classes.max())}, prompts have {out.num_classes}")
        rows = slot_indices(ref.counts, templates)  # (C, M)
        cls = ref.classes.to(out.embedding.device)
        targets = [(out.embedding, ref.embedding, True)] + [(out.pooled[s], ref.pooled[s], False) for s in out.pooled]
        for tensor, crops, unit in targets:
            new = crops[rows].to(tensor)  # (C, M, D)
            old = tensor[b, cls]
            if merge == "blend":
                if unit:  # the cost volume compares directions: blend unit vectors
                    new, old = F.normalize(new, dim=-1), F.normalize(old, dim=-1)
                new = (1 - share) * old + share * new
            tensor[b, cls] = torch.where(slots.view(1, -1, 1), new, old)
        out.crops[b, cls] |= slots.to(out.crops.device)  # blend: every slot carries the crop
    return out


# ---- 5. add: crop prompts as an extra copy of each refined class ----------------------------
def add_classes(
    text: torch.Tensor | None, visual: VisualPrompts, ref: Refinement
) -> tuple[torch.Tensor | None, VisualPrompts, torch.Tensor]:
    """One image's prompts with each refined class appended once more, carrying its crop
    features in all M slots: (text (N + C, M, D) or None, visual (1, N + C, M, ...), owners (C,))."""
    n, templates = visual.num_classes, visual.num_templates
    base = visual.per_image(1)
    owners = ref.classes.to(base.embedding.device)
    rows = slot_indices(ref.counts, templates)
    embedding = torch.cat([base.embedding, ref.embedding[rows].to(base.embedding)[None]], dim=1)
    pooled = {s: torch.cat([p, ref.pooled[s][rows].to(p)[None]], dim=1) for s, p in base.pooled.items()}
    crops = torch.cat([base.crops, base.crops.new_ones(1, len(owners), templates)], dim=1)
    text2 = None if text is None else torch.cat([text, text[owners.to(text.device)]], dim=0)
    if owners.numel() and int(owners.max()) >= n:
        raise ValueError(f"refinement names class {int(owners.max())}, prompts have {n}")
    return text2, VisualPrompts(embedding, pooled, crops), owners


def merge_added(logits: torch.Tensor, owners: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, N + C, h, w) logits of `add_classes` prompts -> (B, N, h, w): each refined class
    scores the max of its bank copy and its crop copy."""
    out = logits[:, :num_classes].clone()
    for j, c in enumerate(owners.tolist()):
        out[:, c] = torch.maximum(out[:, c], logits[:, num_classes + j])
    return out


# ---- 6. fast pass II: decode each image's k best pass-I classes only ------------------------
def top_classes(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) class indices, ascending, of each image's k classes with the highest pass-I logit
    anywhere (all classes, in order, when k >= N)."""
    n = logits.shape[1]
    if k >= n:
        return torch.arange(n, device=logits.device).expand(logits.shape[0], n)
    best = logits.flatten(2).amax(dim=2)  # (B, N)
    return best.topk(k, dim=1).indices.sort(dim=1).values


def select_classes(
    text: torch.Tensor | None, visual: VisualPrompts, index: torch.Tensor
) -> tuple[torch.Tensor | None, VisualPrompts]:
    """Per-image prompts of the classes `index` (B, k): text (B, k, M, D), visual (B, k, M, ...),
    with their crop marks."""
    b = index.shape[0]

    def gather(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 3:  # shared by every image: no per-image copy of all N classes
            return t[index.to(t.device)]
        idx = index.to(t.device).view(b, -1, 1, 1).expand(-1, -1, *t.shape[-2:])
        return t.gather(1, idx)

    text_k = None if text is None else gather(text)
    crops = None  # (B, N, M) marks: always per image
    if visual.crops is not None:
        crops = visual.crops.gather(1, index.to(visual.crops.device).unsqueeze(-1).expand(-1, -1, visual.num_templates))
    return text_k, VisualPrompts(gather(visual.embedding), {s: gather(p) for s, p in visual.pooled.items()}, crops)


def restrict_refinement(ref: Refinement, classes: torch.Tensor) -> Refinement:
    """`ref` for prompts holding only `classes` (ascending vocabulary indices): its classes
    renumbered to positions in `classes`, the refined classes outside them (and their crops)
    dropped."""
    classes = classes.cpu()
    position = torch.searchsorted(classes, ref.classes)
    inside = position < classes.numel()
    inside[inside.clone()] = classes[position[inside]] == ref.classes[inside]
    return replace(keep_refined(ref, inside), classes=position[inside])


def keep_refined(ref: Refinement, keep: torch.Tensor) -> Refinement:
    """`ref` with only the refined classes where `keep` (C,) bool is true, and their crops."""
    rows = torch.repeat_interleave(keep, ref.counts)
    pooled = {s: p[rows] for s, p in ref.pooled.items()}
    return Refinement(ref.classes[keep], ref.areas[keep], ref.counts[keep], ref.embedding[rows], pooled)


def scatter_classes(base: torch.Tensor, index: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """`base` logits (B, N, h, w) with the classes `index` (B, k) replaced by `part` (B, k, h, w)."""
    idx = index.to(base.device).view(*index.shape, 1, 1).expand(-1, -1, *base.shape[-2:])
    return base.clone().scatter_(1, idx, part.to(base.dtype))
