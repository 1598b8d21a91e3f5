"""Class subsets: train or evaluate on part of a dataset's vocabulary, as a new dataset would be.

A prepared dataset may declare named subsets in `dataset.json` extra as `<name>_ids` (the
synthetic `shapes` benchmark declares `seen_ids`, `unseen_ids` and `background_ids`, the canvas
class when the canvas is labelled, else none). Restricting to a subset
keeps only those classes' prompts and relabels the ground truth: subset classes get ids
0..K-1 in subset order, every other class becomes the ignore value.

    keep = resolve_subset(dataset.info, "unseen")      # dataset class ids, in order
    names = [dataset.class_names[i] for i in keep]
    label = remap_labels(label, keep, dataset.num_classes, dataset.ignore_index)
"""

from __future__ import annotations

import numpy as np
import torch

from dpseg.data.layout import LayoutInfo
from dpseg.errors import UserError


def available_subsets(info: LayoutInfo) -> list[str]:
    return sorted(k[: -len("_ids")] for k, v in info.extra.items() if k.endswith("_ids") and isinstance(v, list))


def resolve_subset(info: LayoutInfo, subset: str | None) -> list[int]:
    """Dataset class ids of `subset`: None or "all" -> every class; a declared name
    ("seen", "unseen"); comma-separated ids ("0,3,7"); or a union of those joined by "+"
    ("unseen+background": the unseen classes, then the dataset's background classes)."""
    if subset in (None, "", "all"):
        return list(range(info.num_classes))
    ids = [i for part in subset.split("+") for i in _resolve_part(info, part.strip())]
    bad = [i for i in ids if not 0 <= i < info.num_classes]
    if bad or not ids or len(set(ids)) != len(ids):
        raise UserError(f"class subset {subset!r} must list distinct ids in 0..{info.num_classes - 1}; got {ids[:10]}")
    return ids


def is_subset_expression(info: LayoutInfo, text: str | None) -> bool:
    """Whether `text` is something `resolve_subset` reads (rather than, say, class names)."""
    return text in (None, "", "all") or all(_part_kind(info, part.strip()) for part in text.split("+"))


def _part_kind(info: LayoutInfo, part: str) -> str | None:
    if f"{part}_ids" in info.extra:
        return "declared"
    if part and all(p.strip().isdigit() for p in part.split(",")):
        return "ids"
    return None


def _resolve_part(info: LayoutInfo, part: str) -> list[int]:
    kind = _part_kind(info, part)
    if kind == "declared":
        return [int(i) for i in info.extra[f"{part}_ids"]]
    if kind == "ids":
        return [int(p) for p in part.split(",")]
    have = ", ".join(available_subsets(info)) or "none"
    raise UserError(f"dataset {str(info.root)!r} declares no class subset {part!r} (it has: {have}); "
                    "pass one of those, 'all', comma-separated class ids, or a union of them joined by '+'")


def remap_table(keep: list[int], num_classes: int, ignore_index: int) -> np.ndarray:
    """Lookup table over dataset ids 0..num_classes-1 -> subset ids, `ignore_index` elsewhere."""
    table = np.full(num_classes, ignore_index, dtype=np.int64)
    table[np.asarray(keep, dtype=np.int64)] = np.arange(len(keep))
    return table


def remap_labels(label, keep: list[int], num_classes: int, ignore_index: int):
    """Relabels a numpy array or torch tensor of dataset ids (ignore kept as is)."""
    if len(keep) == num_classes and list(keep) == list(range(num_classes)):
        return label
    table = remap_table(keep, num_classes, ignore_index)
    if isinstance(label, torch.Tensor):
        lut = torch.from_numpy(table).to(label.device)
        valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
        return torch.where(valid, lut[label.long().clamp(0, num_classes - 1)], torch.full_like(label.long(), ignore_index))
    label = np.asarray(label).astype(np.int64)
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    return np.where(valid, table[np.clip(label, 0, num_classes - 1)], ignore_index)
