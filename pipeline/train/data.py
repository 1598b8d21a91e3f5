"""Training samples as a pure function of (seed, position in the sample stream).

The global stream visits the training set epoch after epoch, each epoch in its own seeded
order; optimizer step s consumes positions [s*B, (s+1)*B) of it (B = the global batch). Each
rank and accumulation micro-step takes a fixed slice of those, and a sample's augmentation is
seeded by its position. So a run's data depend on neither the number of ranks, workers or
accumulation steps, nor on where it was interrupted: a resumed run starts at position s*B.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpseg.data.readers import SegmentationDataset
from dpseg.data.subsets import remap_table
from dpseg.data.transforms import TrainTransform
from dpseg.reproducibility import loader_seeding


@dataclass(frozen=True)
class StreamLayout:
    batch_size: int  # global, per optimizer step
    micro_batch: int  # per rank and micro-step
    grad_accum: int
    world_size: int
    rank: int

    def positions(self, step: int, micro_step: int) -> range:
        start = step * self.batch_size + (micro_step * self.world_size + self.rank) * self.micro_batch
        return range(start, start + self.micro_batch)


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5A3D]).permutation(size)


class SampleStream(torch.utils.data.Sampler):
    """This rank's (dataset index, stream position) pairs from `start_step` to `steps`."""

    def __init__(self, size: int, seed: int, layout: StreamLayout, start_step: int, steps: int):
        self.size, self.seed, self.layout, self.start_step, self.steps = size, seed, layout, start_step, steps
        self._orders: dict[int, np.ndarray] = {}

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.size, self.seed, epoch)}  # one epoch held at a time
        return int(self._orders[epoch][offset])

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            for micro in range(self.layout.grad_accum):
                for position in self.layout.positions(step, micro):
                    yield self.index_at(position), position

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.layout.grad_accum * self.layout.micro_batch


class TrainSamples(torch.utils.data.Dataset):
    """Indexed by (dataset index, stream position): the subset's labels (others -> ignore), then
    SED's train transform with a generator seeded by the position."""

    def __init__(self, dataset: SegmentationDataset, keep: list[int], transform: TrainTransform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.table = remap_table(keep, dataset.num_classes, dataset.ignore_index)
        self.identity = list(keep) == list(range(dataset.num_classes))

    def __len__(self) -> int:
        return len(self.dataset)

    def relabel(self, label: np.ndarray) -> np.ndarray:
        if self.identity:
            return label
        ignore = self.dataset.ignore_index
        valid = (label >= 0) & (label < len(self.table))
        return np.where(valid, self.table[np.clip(label, 0, len(self.table) - 1)], ignore)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, position = item
        image, label = self.dataset.load(index)
        rng = np.random.default_rng([self.seed, position, 0x7A1])
        sample = self.transform(image, self.relabel(label), rng)
        return sample["image"], sample["label"]


def train_loader(
    dataset: SegmentationDataset,
    keep: list[int],
    crop_size: int,
    seed: int,
    layout: StreamLayout,
    start_step: int,
    steps: int,
    num_workers: int,
    pin_memory: bool,
    color_jitter: bool = True,
) -> torch.utils.data.DataLoader:
    transform = TrainTransform(
        crop_size=crop_size, short_edge=crop_size, ignore_index=dataset.ignore_index, color_jitter=color_jitter
    )
    samples = TrainSamples(dataset, keep, transform, seed)
    sampler = SampleStream(len(dataset), seed, layout, start_step, steps)
    return torch.utils.data.DataLoader(
        samples,
        batch_size=layout.micro_batch,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
        # its own generator, seeded (creating the iterator must not draw from the global RNG), and
        # every worker's numpy/random seeded from it: samples are seeded by position anyway
        **loader_seeding(seed),
    )
