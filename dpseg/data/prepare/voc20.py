"""PASCAL VOC 2012 -> voc-20: indices 1..20 become train ids 0..19; background (0) and the
void border (255) become ignore, as SED evaluates PAS-20 without background.

Raw layout (VOCtrainval_11-May-2012.tar, optionally SegmentationClassAug.zip):
    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass[Aug]/<id>.png
    VOCdevkit/VOC2012/ImageSets/Segmentation/<split>.txt
Masks may be palette PNGs (official), single-channel index PNGs (the Aug set) or RGB PNGs
painted with the VOC colour map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpseg.data.prepare.common import BadFile, Item, RawLayoutError, find_root, image_for, read_label_image

NUM_CLASSES = 20
IGNORE = 255
HINT = ("expected VOCdevkit/VOC2012 with JPEGImages/, SegmentationClass(Aug)/ and ImageSets/Segmentation/ "
        "(VOCtrainval_11-May-2012.tar)")


def voc_colormap(count: int = 256) -> np.ndarray:
    """The VOC palette: the bits of an index, three at a time, spread over the high bits of
    R, G and B (index 255 gives the (224, 224, 192) void colour)."""
    cmap = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        value, rgb = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        cmap[index] = rgb
    return cmap


# train id per VOC index: 0 -> ignore, 1..20 -> 0..19, 255 (void) -> ignore
_LUT = np.full(256, IGNORE, dtype=np.uint8)
_LUT[1 : NUM_CLASSES + 1] = np.arange(NUM_CLASSES)
_VALID = np.zeros(256, dtype=bool)
_VALID[[*range(NUM_CLASSES + 1), 255]] = True


def decode_voc_mask(path: Path) -> np.ndarray:
    """VOC class indices (0..20, 255) from a palette, index or RGB-painted mask."""
    image = read_label_image(path)
    if image.mode in ("P", "L"):
        indices = np.asarray(image)
    elif image.mode in ("RGB", "RGBA"):
        indices = _rgb_to_index(np.asarray(image.convert("RGB")), path)
    else:
        raise BadFile(path, f"unsupported mask mode {image.mode} (expected palette, index or RGB PNG)")
    bad = np.unique(indices[~_VALID[indices]])
    if bad.size:
        raise BadFile(path, f"holds index values {bad[:5].tolist()} that are not VOC classes (0-20, 255)")
    return indices


def _rgb_to_index(rgb: np.ndarray, path: Path) -> np.ndarray:
    cmap = voc_colormap()
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    known = [*range(NUM_CLASSES + 1), 255]
    lookup = {int(c[0]) << 16 | int(c[1]) << 8 | int(c[2]): i for i, c in ((i, cmap[i]) for i in known)}
    out = np.empty(codes.shape, dtype=np.uint8)
    for code in np.unique(codes):
        if int(code) not in lookup:
            colour = ((code >> 16) & 255, (code >> 8) & 255, code & 255)
            count = int((codes == code).sum())
            raise BadFile(path, f"RGB mask has colour {tuple(int(c) for c in colour)} on {count} pixels, "
                                f"not in the VOC colour map")
        out[codes == code] = lookup[int(code)]
    return out


def to_train_ids(indices: np.ndarray) -> np.ndarray:
    return _LUT[indices]


def collect(src: Path, splits: list[str]) -> list[Item]:
    root = find_root(src, ["VOCdevkit/VOC2012", "VOC2012"], "JPEGImages", HINT)
    mask_dirs = [d for d in (root / "SegmentationClassAug", root / "SegmentationClass") if d.is_dir()]
    if not mask_dirs:
        raise RawLayoutError(f"no SegmentationClassAug/ or SegmentationClass/ in {root}; {HINT}")
    items = []
    for split in splits:
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise RawLayoutError(f"missing split list {listing} (one image id per line; it ships with the VOC tarball)")
        for item_id in _read_ids(listing):
            candidates = [d / f"{item_id}.png" for d in mask_dirs]
            mask = next((m for m in candidates if m.exists()), candidates[0])
            label = lambda m=mask: to_train_ids(decode_voc_mask(m))  # noqa: E731
            items.append(Item(split, item_id, image_for(root / "JPEGImages", item_id), label))
    return items


def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
