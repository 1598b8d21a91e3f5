"""Reading a prepared dataset (any of the six benchmarks or `shapes`) as a torch Dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpseg.data.layout import LayoutError, LayoutInfo, read_layout
from dpseg.data.vocab import load_vocab


class SegmentationDataset(torch.utils.data.Dataset):
    """Items are dicts: "image" uint8 (3, H, W), "label" int64 (H, W) of train ids with
    `ignore_index` where unlabelled, "id", "index" (+ whatever the transform adds)."""

    def __init__(self, root: str | Path, split: str = "val", transform: Callable | None = None):
        self.info: LayoutInfo = read_layout(root)
        if split not in self.info.splits:
            raise LayoutError(
                f"prepared dataset {str(root)!r} has no split {split!r}; it has {', '.join(self.info.splits)}"
            )
        self.split = split
        self.ids = self.info.splits[split]
        self.transform = transform
        self.class_names: list[str] = load_vocab(self.info.vocabulary)
        if len(self.class_names) != self.info.num_classes:
            raise LayoutError(
                f"{str(root)!r} was prepared for {self.info.num_classes} classes "
                f"but vocabulary {self.info.vocabulary!r} has {len(self.class_names)}"
            )

    @property
    def ignore_index(self) -> int:
        return self.info.ignore_index

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The untransformed pair: RGB uint8 (H, W, 3) and int64 train ids (H, W)."""
        item_id = self.ids[index]
        image_path = self.info.image_path(self.split, item_id)
        label_path = self.info.label_path(self.split, item_id)
        image = np.asarray(_open(image_path).convert("RGB"))
        label = np.asarray(_open(label_path)).astype(np.int64)
        if label.shape != image.shape[:2]:
            raise LayoutError(
                f"{label_path} is {label.shape[::-1]} but its image is {image.shape[1::-1]}; prepare the dataset again"
            )
        return image, label

    def __getitem__(self, index: int) -> dict:
        image, label = self.load(index)
        if self.transform is None:
            sample = {
                "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "label": torch.from_numpy(label),
            }
        else:
            sample = self.transform(image, label)
        return {**sample, "id": self.ids[index], "index": index}


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, SyntaxError, ValueError) as err:
        raise LayoutError(
            f"{path} is missing or unreadable ({err}); rerun `dpseg data prepare` to repair the dataset"
        ) from None
