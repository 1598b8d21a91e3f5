"""COCO-Stuff 164k -> coco-stuff: the stuffthingmaps hold ids 0..181 (COCO id - 1) with
255 unlabeled; the 171 ids in use map to contiguous train ids in SED's order, the 11
unused thing ids and 255 to ignore.

Raw layout (COCO 2017 images + stuffthingmaps_trainval2017.zip):
    coco-stuff/images/{train2017,val2017}/*.jpg
    coco-stuff/annotations/{train2017,val2017}/*.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpseg.data.prepare.common import Item, RawLayoutError, find_root, id_lookup, image_for, indexed_label

NUM_CLASSES = 171
SPLIT_DIRS = {"train": "train2017", "val": "val2017"}
HINT = ("expected coco-stuff/ with images/{train2017,val2017} and annotations/{train2017,val2017} "
        "(stuffthingmaps_trainval2017.zip)")


LUT = id_lookup("coco-stuff.json", NUM_CLASSES, 256, 255)


def to_train_ids(annotation: np.ndarray) -> np.ndarray:
    return LUT[annotation]


def collect(src: Path, splits: list[str]) -> list[Item]:
    root = find_root(src, ["coco-stuff", "cocostuff"], "annotations", HINT)
    items = []
    for split in splits:
        ann_dir, img_dir = root / "annotations" / SPLIT_DIRS[split], root / "images" / SPLIT_DIRS[split]
        if not ann_dir.is_dir():
            raise RawLayoutError(f"missing {ann_dir}; {HINT}")
        for ann in sorted(ann_dir.glob("*.png")):
            label = lambda a=ann: to_train_ids(indexed_label(a, 255))  # noqa: E731
            items.append(Item(split, ann.stem, image_for(img_dir, ann.stem), label))
    return items
