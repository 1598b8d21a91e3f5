"""PASCAL Context (on VOC 2010) -> pc-59 and pc-459.

pc-59 (SED's prepare_pascal_context_59): `trainval_merged.json` holds, per image, RLE masks
whose category ids are PASCAL Context's 459-label ids; they are painted in file order, then
the 59 used ids (sorted) become train ids 0..58 and everything else (0 = unlabelled,
rarer classes) ignore 255. Splits come from each image's "phase".

pc-459 (SED's prepare_pascal_context_459): `trainval/<id>.mat` holds `LabelMap` with
values 1..459 = train id + 1; a 0 (unlabelled) becomes ignore 65535 (uint16). The val
split is SED's `pascalcontext_val.txt` (5104 ids, packaged here); train = the other .mat files.

Raw layout (VOCtrainval_03-May-2010.tar + trainval_merged.json + trainval.tar.gz):
    VOCdevkit/VOC2010/JPEGImages/<id>.jpg
    VOCdevkit/VOC2010/trainval_merged.json      (pc-59)
    VOCdevkit/VOC2010/trainval/<id>.mat         (pc-459)
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import scipy.io

from dpseg.data.prepare import rle
from dpseg.data.prepare.common import BadFile, Item, RawLayoutError, find_root, id_lookup, image_for

PC59_CLASSES, PC459_CLASSES = 59, 459
HINT = "expected VOCdevkit/VOC2010 with JPEGImages/ plus trainval_merged.json (pc-59) or trainval/*.mat (pc-459)"
ROOTS = ["VOCdevkit/VOC2010", "VOC2010"]


PC59_LUT = id_lookup("pc-59.json", PC59_CLASSES, 65536, 255)


def pc59_label(annotations: list[dict], height: int, width: int, source: Path) -> np.ndarray:
    raw = np.zeros((height, width), dtype=np.uint16)
    for ann in annotations:
        try:
            mask = rle.decode(ann["segmentation"])
            category = int(ann["category_id"])
        except (KeyError, TypeError, ValueError) as err:
            raise BadFile(source, f"annotation of image {ann.get('image_id')!r} is not a valid RLE mask "
                                  f"({err})") from None
        if mask.shape != raw.shape:
            raise BadFile(source, f"annotation of image {ann.get('image_id')!r} is {mask.shape}, image is {raw.shape}")
        if not 0 <= category < 65536:
            raise BadFile(source, f"category id {category} out of range")
        raw[mask] = category
    return PC59_LUT[raw]


def collect_pc59(src: Path, splits: list[str]) -> list[Item]:
    root = find_root(src, ROOTS, "trainval_merged.json", HINT)
    source = root / "trainval_merged.json"
    try:
        data = json.loads(source.read_text("utf-8"))
        images = data["images"]
        annotations = data["annos_segmentation"]
    except (OSError, ValueError, KeyError) as err:
        raise RawLayoutError(f"{source} is not a readable PASCAL Context annotation file ({err}); "
                             f"download trainval_merged.json again") from None
    by_image: dict = {}
    for ann in annotations:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    items = []
    for image in images:
        split = image.get("phase")
        if split not in splits:
            continue
        stem = Path(image["file_name"]).stem
        anns = by_image.get(image["image_id"], [])
        h, w = int(image["height"]), int(image["width"])
        label = lambda a=anns, h=h, w=w: pc59_label(a, h, w, source)  # noqa: E731
        items.append(Item(split, stem, image_for(root / "JPEGImages", stem), label))
    return items


def pc459_label(path: Path) -> np.ndarray:
    if not path.is_file():
        raise BadFile(path, "label .mat file is missing")
    try:
        label_map = scipy.io.loadmat(path)["LabelMap"]
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as err:
        raise BadFile(path, f"not a PASCAL Context label file with a LabelMap ({err})") from None
    label_map = np.asarray(label_map).astype(np.int64)
    if label_map.ndim != 2 or label_map.min(initial=0) < 0 or label_map.max(initial=0) > PC459_CLASSES:
        raise BadFile(path, f"LabelMap must be a 2-D map of values 0..{PC459_CLASSES}")
    out = np.where(label_map == 0, 65535, label_map - 1)
    return out.astype(np.uint16)


def _val_ids(root: Path) -> list[str]:
    # a list next to the data (where SED expects it) wins over the packaged copy
    local = root / "pascalcontext_val.txt"
    packaged = resources.files("dpseg.data.prepare").joinpath("ids", "pascalcontext_val.txt")
    text = local.read_text() if local.is_file() else packaged.read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def collect_pc459(src: Path, splits: list[str]) -> list[Item]:
    root = find_root(src, ROOTS, "trainval", HINT)
    mats = root / "trainval"
    val_ids = _val_ids(root)
    items = []
    for split in splits:
        if split == "val":
            ids = val_ids
        else:
            held_out = set(val_ids)
            ids = sorted(p.stem for p in mats.glob("*.mat") if p.stem not in held_out)
        for stem in ids:
            label = lambda m=mats / f"{stem}.mat": pc459_label(m)  # noqa: E731
            items.append(Item(split, stem, image_for(root / "JPEGImages", stem), label))
    return items
