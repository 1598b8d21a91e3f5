"""Readers over the prepared layout and SED's train/eval transforms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dpseg.data.layout import LayoutError, PreparedWriter, read_layout
from dpseg.data.readers import SegmentationDataset
from dpseg.data.synth import write_shapes_benchmark
from dpseg.data.transforms import EvalTransform, TrainTransform, collate_eval, photometric_distort, short_edge_size


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "shapes"
    write_shapes_benchmark(root, images=6, val_images=4, size=64, seed=2, progress=False)
    return root


def blocks(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose colour encodes its label: four quadrants, label k has colour 60k."""
    label = np.zeros((h, w), np.int64)
    label[: h // 2, w // 2 :], label[h // 2 :, : w // 2], label[h // 2 :, w // 2 :] = 1, 2, 3
    image = np.repeat((label * 60).astype(np.uint8)[..., None], 3, axis=2)
    return image, label


def test_dataset_items(bench):
    dataset = SegmentationDataset(bench, "val")
    assert len(dataset) == 4 and dataset.ignore_index == 255 and dataset.num_classes == 48
    sample = dataset[1]
    assert sample["image"].dtype == torch.uint8 and tuple(sample["image"].shape) == (3, 64, 64)
    assert sample["label"].dtype == torch.int64 and tuple(sample["label"].shape) == (64, 64)
    assert sample["id"] == "000001" and sample["index"] == 1
    image, label = dataset.load(1)
    np.testing.assert_array_equal(image, np.asarray(Image.open(bench / "images" / "val" / "000001.png")))
    np.testing.assert_array_equal(label, np.asarray(Image.open(bench / "labels" / "val" / "000001.png")))


def test_uint16_labels_keep_their_ignore_value(tmp_path):
    writer = PreparedWriter(tmp_path / "big", "ade-847", "ade-847", 847)
    writer.begin()
    label = np.array([[0, 846], [65535, 400]], dtype=np.uint16)
    writer.write_item("val", "x", Image.fromarray(np.zeros((2, 2, 3), np.uint8)), ".png", label)
    writer.finish({"val": ["x"]}, {})
    dataset = SegmentationDataset(tmp_path / "big", "val")
    assert dataset.ignore_index == 65535
    np.testing.assert_array_equal(dataset[0]["label"].numpy(), label.astype(np.int64))
    with pytest.raises(ValueError, match="neither train ids"):
        writer.write_item(
            "val", "y", Image.fromarray(np.zeros((1, 1, 3), np.uint8)), ".png", np.array([[847]], np.uint16)
        )


def test_layout_errors_name_the_folder_and_the_fix(tmp_path, bench):
    with pytest.raises(LayoutError, match="does not exist.*dpseg data prepare"):
        SegmentationDataset(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / ".prepare-state.json").write_text(json.dumps({"dataset": "shapes"}))
    with pytest.raises(LayoutError, match="interrupted"):
        read_layout(tmp_path / "half")
    with pytest.raises(LayoutError, match="no split 'test'.*train, val"):
        SegmentationDataset(bench, "test")


def test_corrupt_label_file_is_named(tmp_path):
    root = tmp_path / "s"
    write_shapes_benchmark(root, images=1, val_images=1, size=48, progress=False)
    broken = root / "labels" / "val" / "000000.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(LayoutError, match="000000.png"):
        SegmentationDataset(root, "val")[0]


def test_short_edge_resize_caps_the_long_edge():
    assert short_edge_size(480, 640, 768, 2666) == (768, 1024)
    assert short_edge_size(100, 1000, 768, 2666) == (267, 2666)


def test_train_transform_keeps_image_and_label_aligned():
    image, label = blocks(120, 90)
    transform = TrainTransform(crop_size=64, short_edge=80, color_jitter=False)
    flips = set()
    for seed in range(8):
        out = transform(image, label, np.random.default_rng(seed))
        img, lab = out["image"].numpy(), out["label"].numpy()
        assert img.shape == (3, 64, 64) and lab.shape == (64, 64) and lab.dtype == np.int64
        valid = lab != 255
        # colour 60k <=> label k, except on the one-pixel seams that bilinear resizing blurs
        agree = img[0][valid] == lab[valid] * 60
        assert agree.mean() > 0.9
        flips.add(bool(lab[0, 0] == 1))
    assert flips == {True, False}  # the horizontal flip happens, sometimes


def test_train_transform_pads_small_images_with_ignore():
    image, label = blocks(40, 30)
    out = TrainTransform(crop_size=64, short_edge=30, color_jitter=False, flip=False, ignore_index=255)(
        image, label, np.random.default_rng(0)
    )
    lab, img = out["label"].numpy(), out["image"].numpy()
    assert (lab[:, 30:] == 255).all() and (lab[40:] == 255).all() and (lab[:40, :30] != 255).all()
    assert (img[:, :, 30:] == 128).all()


def test_photometric_distort_is_seeded_and_changes_colours():
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    a = photometric_distort(image, np.random.default_rng(1))
    b = photometric_distort(image, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == image.shape
    assert any(not np.array_equal(photometric_distort(image, np.random.default_rng(s)), image) for s in range(5))


def test_eval_transform_resizes_input_only_and_collates(bench):
    dataset = SegmentationDataset(bench, "val", transform=EvalTransform(768))
    sample = dataset[0]
    assert tuple(sample["image"].shape) == (3, 768, 768) and sample["image"].dtype == torch.uint8
    assert tuple(sample["label"].shape) == (64, 64) and sample["orig_size"] == (64, 64)
    small, label = blocks(30, 20)
    other = {**EvalTransform(768)(small, label), "id": "b", "index": 9}
    batch = collate_eval([sample, other])
    assert tuple(batch["image"].shape) == (2, 3, 768, 768)
    assert [tuple(t.shape) for t in batch["label"]] == [(64, 64), (30, 20)] and batch["id"] == [sample["id"], "b"]


def test_dataloader_batches_training_crops(bench):
    torch.manual_seed(0)
    dataset = SegmentationDataset(bench, "train", transform=TrainTransform(crop_size=48, short_edge=56))
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=False)))
    assert tuple(batch["image"].shape) == (3, 3, 48, 48) and tuple(batch["label"].shape) == (3, 48, 48)
