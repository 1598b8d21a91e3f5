"""The synthetic `shapes` world: categories and split, the prompt renderer (determinism,
template words, speed) and the benchmark (label/image agreement, determinism, CLI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dpseg.clip.templates import TEMPLATES
from dpseg.data import shapes
from dpseg.data.readers import SegmentationDataset
from dpseg.data.synth import write_shapes_benchmark
from dpseg.data.vocab import load_vocab
from dpseg.errors import UserError


def test_categories_and_compositional_split():
    cats = shapes.SHAPES_CATEGORIES
    assert len(cats) == len(set(cats)) == 4 * 3 * 4
    assert "red striped triangle" in cats and load_vocab("shapes") == cats
    assert set(shapes.SEEN) | set(shapes.UNSEEN) == set(cats) and not set(shapes.SEEN) & set(shapes.UNSEEN)
    assert len(shapes.UNSEEN) == 12
    assert [cats[i] for i in shapes.UNSEEN_IDS] == shapes.UNSEEN
    seen_words = [set(name.split()) for name in shapes.SEEN]
    for name in shapes.UNSEEN:  # each attribute of an unseen category is seen elsewhere
        for word in name.split():
            assert any(word in words for words in seen_words), (name, word)


def test_prompt_images_are_deterministic_and_order_independent():
    a1 = shapes.render_prompt_image("red striped triangle", "a photo of many {}.", 64, 7)
    b1 = shapes.render_prompt_image("blue dotted star", "a sketch of a {}.", 64, 7)
    b2 = shapes.render_prompt_image("blue dotted star", "a sketch of a {}.", 64, 7)
    a2 = shapes.render_prompt_image("red striped triangle", "a photo of many {}.", 64, 7)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    other_seed = shapes.render_prompt_image("red striped triangle", "a photo of many {}.", 64, 8)
    assert not np.array_equal(a1, other_seed)


def test_every_template_renders_at_every_size_and_repeats_under_its_seed():
    for template in TEMPLATES:
        for size in (64, 128):
            image = shapes.render_prompt_image("green dotted square", template, size, 0)
            assert image.shape == (size, size, 3) and image.dtype == np.uint8
            assert np.array_equal(image, shapes.render_prompt_image("green dotted square", template, size, 0))


def blue_pixels(image: np.ndarray) -> np.ndarray:
    """Object pixels of a blue category: blue clearly above red and green (the background
    is near grey, the darker texture tone keeps the hue)."""
    rgb = image.astype(int)
    return rgb[..., 2] - np.maximum(rgb[..., 0], rgb[..., 1]) > 40


def mean_over_seeds(template: str, measure, seeds=range(12)) -> float:
    return float(np.mean([measure(shapes.render_prompt_image("blue solid circle", template, 96, s)) for s in seeds]))


def test_template_words_change_the_rendering():
    def fraction(image):
        return blue_pixels(image).mean()

    def instances(image):
        labels, count = ndimage.label(blue_pixels(image))
        return sum(1 for k in range(1, count + 1) if (labels == k).sum() >= 4)

    plain = "a photo of a {}."
    assert (
        mean_over_seeds("a photo of the small {}.", fraction)
        < mean_over_seeds(plain, fraction)
        < mean_over_seeds("a close-up photo of a {}.", fraction)
    )
    assert mean_over_seeds(plain, instances) == 1
    assert mean_over_seeds("a photo of many {}.", instances) >= 2.5
    assert mean_over_seeds("a sketch of a {}.", fraction) < 0.2 * mean_over_seeds(plain, fraction) + 1e-9
    grey = shapes.render_prompt_image("blue solid circle", "a black and white photo of a {}.", 96, 0).astype(int)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()

    def sharpness(image):
        return np.abs(np.diff(image.astype(float), axis=1)).mean()

    assert mean_over_seeds("a blurry photo of a {}.", sharpness) < 0.6 * mean_over_seeds(plain, sharpness)


def test_unknown_categories_get_a_stable_look():
    assert shapes.parse_category("wall") == shapes.parse_category("wall")
    look = shapes.parse_category("a striped blue thing")
    assert look.colour == shapes.COLOURS["blue"] and look.texture == "striped"
    image = shapes.render_prompt_image("wall", "a photo of a {}.", 64, 1)
    assert image.shape == (64, 64, 3)


def test_scene_labels_agree_with_pixels():
    """A labelled pixel is its category's colour times one factor (texture shade x jitter);
    an unlabelled pixel is near grey."""
    for index in range(12):
        image, label = shapes.render_scene(96, 3, f"t{index}", list(range(48)))
        rgb = image.astype(float)
        spread = rgb.max(-1) - rgb.min(-1)
        assert (spread[label == 255] < 40).all()
        for category in np.unique(label[label != 255]):
            base = np.asarray(shapes.parse_category(shapes.SHAPES_CATEGORIES[category]).colour, float)
            pixels = rgb[label == category]
            k = pixels @ base / (base @ base)
            assert ((k > 0.44) & (k < 1.1)).all()
            assert np.abs(pixels - k[:, None] * base).max() <= 3.0


def test_synth_writes_a_benchmark_the_readers_load(tmp_path):
    report = write_shapes_benchmark(tmp_path / "a", images=12, val_images=24, size=64, seed=5, progress=False)
    assert report.written == 36
    train = SegmentationDataset(tmp_path / "a", "train")
    val = SegmentationDataset(tmp_path / "a", "val")
    assert (len(train), len(val)) == (12, 24) and train.class_names == shapes.SHAPES_CATEGORIES
    train_ids = set().union(*(np.unique(train[i]["label"].numpy()).tolist() for i in range(len(train)))) - {255}
    val_ids = set().union(*(np.unique(val[i]["label"].numpy()).tolist() for i in range(len(val)))) - {255}
    assert train_ids <= set(shapes.SEEN_IDS)
    assert val_ids & set(shapes.UNSEEN_IDS)
    assert train.info.extra["unseen"] == shapes.UNSEEN
    sample = val[0]
    assert sample["image"].dtype.is_floating_point is False and tuple(sample["image"].shape) == (3, 64, 64)

    # same command, same bytes; another seed, other images
    write_shapes_benchmark(tmp_path / "b", images=12, val_images=24, size=64, seed=5, progress=False)
    for path in (tmp_path / "a").rglob("*.png"):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
    write_shapes_benchmark(tmp_path / "c", images=1, val_images=0, size=64, seed=6, progress=False)
    assert (tmp_path / "c" / "images" / "train" / "000000.png").read_bytes() != (
        tmp_path / "a" / "images" / "train" / "000000.png"
    ).read_bytes()


def test_synth_resumes_and_refuses_other_settings(tmp_path):
    write_shapes_benchmark(tmp_path / "s", images=3, size=48, progress=False)
    (tmp_path / "s" / "labels" / "val" / "000001.png").unlink()
    again = write_shapes_benchmark(tmp_path / "s", images=3, size=48, progress=False)
    assert (again.written, again.resumed) == (1, 5)
    with pytest.raises(UserError, match="other settings"):
        write_shapes_benchmark(tmp_path / "s", images=3, size=64, progress=False)


@pytest.mark.parametrize("kwargs,needle", [({"size": 10}, "--size"), ({"images": 0, "val_images": 0}, "--images")])
def test_synth_rejects_bad_arguments(tmp_path, kwargs, needle):
    with pytest.raises(UserError, match=needle):
        write_shapes_benchmark(tmp_path / "x", progress=False, **kwargs)


def test_cli_synth(tmp_path, cli):
    result = cli(
        "data", "synth", "--out", tmp_path / "bench", "--images", "4", "--size", "48", "--seed", "1", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert "train 4, val 4" in result.output
    info = cli("data", "info", tmp_path / "bench")
    assert "shapes" in info.output and "48 classes" in info.output


def test_prepare_shapes_is_synth_with_defaults(tmp_path, cli):
    result = cli("data", "prepare", "shapes", "--out", tmp_path / "p", "--no-progress")
    assert result.exit_code == 0, result.output
    dataset = SegmentationDataset(tmp_path / "p", "val")
    assert len(dataset) == 64 and dataset.info.dataset == "shapes"


def test_data_info_never_advises_deleting_a_dataset_it_cannot_read(tmp_path, cli, one_line_error, monkeypatch):
    write_shapes_benchmark(tmp_path / "bench", images=2, size=32, seed=0, val_images=2, progress=False)
    # written with the umask's mode (0644 under 022): another user can read it
    assert (tmp_path / "bench" / "dataset.json").stat().st_mode & 0o044 == 0o044
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in (tmp_path / "bench" / "images").rglob("*.png"))
    real = Path.read_text

    def denied(self, *args, **kwargs):  # what another user without read access meets (root cannot be denied)
        if self.name == "dataset.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    result = cli("data", "info", tmp_path / "bench")
    one_line_error(result, "permission denied", "dataset.json")
    assert "delete" not in result.stderr
