"""`shapes`: the synthetic open-vocabulary benchmark, written in the prepared layout.

train: images holding only SEEN categories (what a model may learn from);
val:   images holding any category, so UNSEEN ones measure open-vocabulary transfer.
Every image is a pure function of (seed, split, index): a killed run resumes, and the same
command always writes the same files.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from tqdm import tqdm

from dpseg.data import shapes
from dpseg.data.layout import PreparedWriter
from dpseg.data.prepare.common import Report
from dpseg.errors import UserError

DEFAULT_IMAGES = 64
DEFAULT_SIZE = 128
DEFAULT_SEED = 0


def write_shapes_benchmark(
    out: str | Path,
    images: int = DEFAULT_IMAGES,
    size: int = DEFAULT_SIZE,
    seed: int = DEFAULT_SEED,
    val_images: int | None = None,
    max_objects: int = 4,
    progress: bool = True,
    background: bool = False,
    scene_style: str = "plain",
) -> Report:
    """`images` train and `val_images` (default: as many) val scenes of size x size.

    background: the canvas is a class ("background", id 48, seen; vocabulary `shapes-background`)
    instead of ignore. scene_style: plain | photo (dpseg.data.shapes.render_scene)."""
    val_images = images if val_images is None else val_images
    if images < 0 or val_images < 0 or images + val_images == 0:
        raise UserError(f"--images must be positive (got train {images}, val {val_images})")
    if not 32 <= size <= 4096:
        raise UserError(f"--size must be between 32 and 4096 pixels, got {size}")
    if max_objects < 1:
        raise UserError(f"max_objects must be at least 1, got {max_objects}")
    if scene_style not in shapes.SCENE_STYLES:
        raise UserError(f"scene style {scene_style!r} is not one of {', '.join(shapes.SCENE_STYLES)}")
    settings = {"images": images, "val_images": val_images, "size": size, "seed": seed, "max_objects": max_objects}
    if background or scene_style != "plain":  # recorded only when used: older datasets keep their settings
        settings.update({"background": background, "scene_style": scene_style})
    names = shapes.WORLD_CATEGORIES if background else shapes.SHAPES_CATEGORIES
    vocabulary = "shapes-background" if background else "shapes"
    writer = PreparedWriter(out, "shapes", vocabulary, len(names), settings=settings)
    writer.begin()
    canvas = len(shapes.SHAPES_CATEGORIES) if background else None
    plan = [("train", i, shapes.SEEN_IDS) for i in range(images)]
    plan += [("val", i, list(range(len(shapes.SHAPES_CATEGORIES)))) for i in range(val_images)]
    written = resumed = 0
    for split, index, allowed in tqdm(plan, desc="synth shapes", unit="img", disable=not progress, leave=False):
        item_id = f"{index:06d}"
        if writer.is_done(split, item_id):
            resumed += 1
            continue
        image, label = shapes.render_scene(
            size, seed, f"{split}/{index}", allowed, max_objects, writer.ignore, canvas, scene_style
        )
        writer.write_item(split, item_id, Image.fromarray(image), ".png", label)
        written += 1
    splits = {"train": [f"{i:06d}" for i in range(images)], "val": [f"{i:06d}" for i in range(val_images)]}
    seen, seen_ids = list(shapes.SEEN), list(shapes.SEEN_IDS)
    if background:  # the canvas is in every training image: a seen class
        seen, seen_ids = [*seen, shapes.BACKGROUND], [*seen_ids, canvas]
    # a new dataset in this world labels its canvas as ADE labels walls: `unseen+background` is that dataset
    background_ids = [canvas] if background else []
    extra = {"seen": seen, "unseen": shapes.UNSEEN, "seen_ids": seen_ids, "unseen_ids": shapes.UNSEEN_IDS,
             "background_ids": background_ids}
    info = writer.finish(splits, {}, extra)
    return Report(info=info, written=written, resumed=resumed)
