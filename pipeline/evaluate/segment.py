"""`dpseg segment`: any photo, any class names, one or two passes, an overlay PNG with a legend.

Classes the bank holds use their bank prompts. Classes it lacks get text-only prompts: their
visual embedding slot takes the text embedding (so the fused prompt is the text prompt) and their
pooled visual-guidance features are zero (no visual cost). With `generate`, the bank's own
generator makes their prompt images first and adds them to the bank (the bank's only writer is
`bank.build`, as for any other build). Pass II then refines every detected class alike.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dpseg.data.vocab import parse_classes
from dpseg.errors import UserError
from dpseg.io import atomic_write_json
from dpseg.refine import DEFAULT_MIN_AREA
from pipeline.evaluate.panels import blend, legend_for, palette, save_panels


@dataclass
class SegmentSettings:
    images: list[str]
    classes: str  # "cat, dog, sofa", a vocabulary name, or a .txt/.json file
    checkpoint: str
    out: str = "out/segment"
    bank: str | None = None
    passes: int = 2
    size: int | None = None
    min_area: int = DEFAULT_MIN_AREA
    crop: str = "masked"
    instances: int = 0
    generate: bool = False
    class_chunk: int | None = None
    device: str = "auto"
    prompts: str | None = None  # text | visual | dual (default: as the checkpoint was trained)
    encoder_weights: str | None = None  # default: the checkpoint's (carried or recorded)


def read_image(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"image {path} is unreadable ({err}); pass a JPEG or PNG file") from None


def generate_missing(bank, missing: list[str], encoder: str, weights: str, encode_size: int) -> None:
    """The bank's generator, with the bank's own settings, makes the missing classes' prompt
    images; `bank.build` stores and encodes them (a bank holds one generator setting)."""
    from dataclasses import fields

    from bank.build import BuildSettings, build_bank
    from bank.generators.base import GeneratorSettings

    recorded = bank.config["generator"].get("settings") or {}
    known = {f.name for f in fields(GeneratorSettings)} - {"device", "dtype", "compile", "extra"}
    options = GeneratorSettings(**{k: v for k, v in recorded.items() if k in known})
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "missing.txt"
        vocab.write_text("".join(f"{n}\n" for n in missing))
        opts = BuildSettings(
            out=bank.root,
            generator=bank.generator,
            vocab=[str(vocab)],
            encoder=encoder,
            encoder_weights=None if weights == "random" else weights,
            encode_size=encode_size,
            templates=int(bank.config["templates"]),
            seed=int(bank.config["seed"]),
            generator_options=options,
            progress=False,
        )
        build_bank(opts)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def expand_images(items: list[str]) -> list[Path]:
    """Files as given, every image file of a folder (sorted), and the matches of a glob pattern
    the shell left unexpanded (sorted); in the order given."""
    import glob

    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif not path.exists() and glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"pattern {item!r} matches no image files")
            paths += found
        else:
            paths.append(path)
    return paths


def check_image(path: Path) -> None:
    """The file exists and its header is an image's (cheap: no pixels decoded)."""
    if not path.is_file():
        raise UserError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UserError(f"image {path} is unreadable ({err}); pass a JPEG or PNG file") from None


def output_names(paths: list[Path]) -> list[str]:
    """One PNG name per image: its stem, numbered when two images share one."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen[p.stem] = seen.get(p.stem, 0) + 1
        names.append(f"{p.stem}.png" if n == 1 else f"{p.stem}-{n}.png")
    return names


def segment(settings: SegmentSettings, progress: bool = True) -> dict:
    """Every image with one loaded session: the model loads once, the prompts are made once."""
    from tqdm.auto import tqdm

    from pipeline.evaluate.session import SegmentSession

    # 1. inputs first: bad images and classes fail before the model loads
    names = parse_classes(settings.classes)
    paths = expand_images(settings.images)
    for p in paths:
        check_image(p)
    if settings.passes not in (1, 2):
        raise UserError(f"--passes must be 1 or 2, got {settings.passes}")
    # 2. the session: checkpoint, bank and prompts (bank prototypes, text-only where it lacks a class)
    session = SegmentSession(
        settings.checkpoint,
        settings.bank,
        settings.device,
        settings.size,
        settings.class_chunk,
        encoder_weights=settings.encoder_weights,
    )
    prompts = session.prompts(names, settings.prompts, generate=settings.generate)
    # 3. each image: pass I, pass II, predictions at the photo's own size, the overlay PNG
    colours = palette(len(names))
    out = Path(settings.out)
    results = []
    bar = tqdm(paths, desc="segment", unit="img", disable=not progress or len(paths) < 2)
    for path, target_name in zip(bar, output_names(paths), strict=True):
        image = read_image(path)
        seg = session.run(image, prompts, settings.passes, settings.min_area, settings.crop, settings.instances)
        target = out / target_name
        overlays = [(f"pass {'I' * p}", blend(image, seg.preds[p], colours)) for p in sorted(seg.preds)]
        tiles = [("image", image), *overlays]
        save_panels(target, tiles, legend_for(list(seg.preds.values()), names, colours))
        results.append({"image": str(path), "output": str(target), "detected": seg.detected})
    report = {
        "classes": names,
        "text_only": prompts.text_only,
        "passes": settings.passes,
        "size": session.size,
        "checkpoint": str(settings.checkpoint),
        "bank": session.bank_dir,
        "images": results,
    }
    atomic_write_json(out / "segment.json", report)
    return report
