"""ADE20K SceneParsing -> ade-150: annotation value v in 1..150 becomes train id v-1;
0 ("other") becomes ignore 255 (SED's prepare_ade20k_150 protocol).

Raw layout (ADEChallengeData2016.zip):
    ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_*.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpseg.data.prepare.common import Item, RawLayoutError, find_root, image_for, indexed_label

NUM_CLASSES = 150
SPLIT_DIRS = {"train": "training", "val": "validation"}
HINT = "expected ADEChallengeData2016/ with images/ and annotations/ (ADEChallengeData2016.zip)"

_LUT = np.full(256, 255, dtype=np.uint8)
_LUT[1 : NUM_CLASSES + 1] = np.arange(NUM_CLASSES)


def to_train_ids(annotation: np.ndarray) -> np.ndarray:
    return _LUT[annotation]


def collect(src: Path, splits: list[str]) -> list[Item]:
    root = find_root(src, ["ADEChallengeData2016"], "annotations", HINT)
    items = []
    for split in splits:
        ann_dir, img_dir = root / "annotations" / SPLIT_DIRS[split], root / "images" / SPLIT_DIRS[split]
        if not ann_dir.is_dir():
            raise RawLayoutError(f"missing {ann_dir}; {HINT}")
        stems = {p.stem for p in ann_dir.glob("*.png")}
        if img_dir.is_dir():  # an image without its annotation is reported, not dropped
            stems |= {p.stem for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
        for stem in sorted(stems):
            ann = ann_dir / f"{stem}.png"
            label = lambda a=ann: to_train_ids(indexed_label(a, NUM_CLASSES))  # noqa: E731
            items.append(Item(split, stem, image_for(img_dir, stem), label))
    return items
