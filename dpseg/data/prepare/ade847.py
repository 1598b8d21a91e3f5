"""ADE20K full (ADE20K_2021_17_01) -> ade-847, SED's prepare_ade20k_full protocol:
class = R / 10 * 256 + G of `<image>_seg.png` (R, G its red and green channels), the 847
evaluated class ids map to train ids in SED's order, everything else to ignore 65535
(uint16); images and labels whose short side exceeds 512 are shrunk to 512 (bilinear /
nearest).

Images are found through their per-image JSON files rather than by unpickling
`index_ade20k.pkl` (pickle can run code); the JSON gives the file name and image size,
which is checked against the image.

Raw layout (ADE20K_2021_17_01.zip):
    ADE20K_2021_17_01/images/ADE/{training,validation}/<scene...>/ADE_*.{jpg,json}, ADE_*_seg.png
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dpseg.data.prepare.common import BadFile, Item, RawLayoutError, find_root, id_lookup, read_label_image

NUM_CLASSES = 847
IGNORE = 65535
MAX_SHORT_SIDE = 512
SPLIT_DIRS = {"train": "training", "val": "validation"}
HINT = "expected ADE20K_2021_17_01/images/ADE/{training,validation}/ with per-image .json, .jpg and _seg.png files"


LUT = id_lookup("ade-847.json", NUM_CLASSES, 26 * 256, IGNORE, np.uint16)  # R // 10 <= 25


def decode_class_mask(rgb: np.ndarray) -> np.ndarray:
    """ADE20K's class code per pixel (0 = unlabelled)."""
    return (rgb[..., 0].astype(np.int32) // 10) * 256 + rgb[..., 1].astype(np.int32)


def seg_to_train_ids(path: Path) -> np.ndarray:
    image = read_label_image(path)
    if image.mode not in ("RGB", "RGBA"):
        raise BadFile(path, f"expected an RGB-coded _seg.png, got mode {image.mode}")
    return LUT[decode_class_mask(np.asarray(image.convert("RGB")))]


def _read_json(path: Path) -> dict:
    try:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # a few ADE20K files are Latin-1
            text = raw.decode("latin-1")
        annotation = json.loads(text)["annotation"]
        if not isinstance(annotation, dict):
            raise TypeError("'annotation' is not an object")
        return annotation
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadFile(path, f"not a readable ADE20K per-image JSON ({err})") from None


def _label_loader(json_path: Path, seg_path: Path):
    def load() -> np.ndarray:
        annotation = _read_json(json_path)
        label = seg_to_train_ids(seg_path)
        size = annotation.get("imsize")
        if isinstance(size, list) and len(size) >= 2 and tuple(label.shape) != (int(size[0]), int(size[1])):
            raise BadFile(seg_path, f"is {label.shape[1]}x{label.shape[0]} but {json_path.name} "
                                    f"says {size[1]}x{size[0]}")
        return label

    return load


def collect(src: Path, splits: list[str]) -> list[Item]:
    root = find_root(src, ["ADE20K_2021_17_01"], "images/ADE", HINT)
    items = []
    for split in splits:
        split_dir = root / "images" / "ADE" / SPLIT_DIRS[split]
        if not split_dir.is_dir():
            raise RawLayoutError(f"missing {split_dir}; {HINT}")
        for json_path in sorted(split_dir.rglob("ADE_*.json")):
            stem = json_path.stem
            image = json_path.with_suffix(".jpg")
            seg = json_path.with_name(f"{stem}_seg.png")
            items.append(Item(split, stem, image, _label_loader(json_path, seg), max_short_side=MAX_SHORT_SIDE))
    return items
