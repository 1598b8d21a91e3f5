"""SED's image/label transforms, written for numpy arrays and returning tensors.

Training (SED's mask_former_semantic mapper, config of the 768 models): resize the short
edge to 768 (long edge capped at 2666), random 768x768 crop, SSD-style photometric
distortion, horizontal flip, then pad to the crop size (image 128, label ignore).
Evaluation: the model input is resized to 768x768; the label keeps its original size, since
logits are upsampled to it before the argmax.
Images stay uint8 (3, H, W): CLIP normalisation belongs to the image tower.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize by index arithmetic (any integer dtype, no class mixing)."""
    h, w = label.shape
    if (h, w) == (height, width):
        return label
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


def short_edge_size(h: int, w: int, short: int, max_long: int) -> tuple[int, int]:
    scale = short / min(h, w)
    if max(h, w) * scale > max_long:
        scale = max_long / max(h, w)
    return max(round(h * scale), 1), max(round(w * scale), 1)


def photometric_distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness +-32, contrast x[0.5, 1.5], saturation x[0.5, 1.5], hue +-18 (OpenCV
    units, i.e. +-36 degrees), each with probability 1/2; contrast before or after the HSV
    changes at random, as in SSD."""
    out = image.astype(np.float32)
    if rng.random() < 0.5:
        out += rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast_first and contrast is not None:
        out *= contrast
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue = rng.uniform(-18, 18) if rng.random() < 0.5 else None
    if saturation is not None or hue is not None:
        hsv = np.asarray(Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
        if saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        if hue is not None:
            hsv[..., 0] = (hsv[..., 0] + hue * 256 / 180) % 256
        out = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first and contrast is not None:
        out *= contrast
    return np.clip(out, 0, 255).astype(np.uint8)


class TrainTransform:
    def __init__(
        self,
        crop_size: int = 768,
        short_edge: int = 768,
        max_long_edge: int = 2666,
        ignore_index: int = 255,
        color_jitter: bool = True,
        flip: bool = True,
        image_pad: int = 128,
    ):
        self.crop_size, self.short_edge, self.max_long_edge = crop_size, short_edge, max_long_edge
        self.ignore_index, self.color_jitter, self.flip, self.image_pad = ignore_index, color_jitter, flip, image_pad

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None) -> dict:
        if rng is None:  # from torch's generator, which DataLoader seeds per worker
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        h, w = short_edge_size(*label.shape, self.short_edge, self.max_long_edge)
        image, label = resize_image(image, h, w), resize_label(label, h, w)
        top = int(rng.integers(0, max(h - self.crop_size, 0) + 1))
        left = int(rng.integers(0, max(w - self.crop_size, 0) + 1))
        image = image[top : top + self.crop_size, left : left + self.crop_size]
        label = label[top : top + self.crop_size, left : left + self.crop_size]
        if self.color_jitter:
            image = photometric_distort(image, rng)
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return {"image": _pad_image(image, self.crop_size, self.image_pad), "label": _pad_label(label, self.crop_size, self.ignore_index)}


class EvalTransform:
    def __init__(self, size: int = 768):
        self.size = size

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None) -> dict:
        resized = resize_image(image, self.size, self.size)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))),
            "label": torch.from_numpy(label.astype(np.int64)),
            "orig_size": tuple(label.shape),
        }


def _pad_image(image: np.ndarray, size: int, value: int) -> torch.Tensor:
    out = np.full((size, size, 3), value, dtype=np.uint8)
    out[: image.shape[0], : image.shape[1]] = image
    return torch.from_numpy(out.transpose(2, 0, 1).copy())


def _pad_label(label: np.ndarray, size: int, ignore: int) -> torch.Tensor:
    out = np.full((size, size), ignore, dtype=np.int64)
    out[: label.shape[0], : label.shape[1]] = label
    return torch.from_numpy(out)


def collate_eval(batch: list[dict]) -> dict:
    """Stacks the equal-sized model inputs; labels keep their own sizes, so stay a list."""
    out = {"image": torch.stack([b["image"] for b in batch])}
    for key in batch[0]:
        if key != "image":
            out[key] = [b[key] for b in batch]
    return out
