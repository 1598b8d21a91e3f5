"""What every converter shares: the item description, file errors that name the file, image
reading with validation, and the resumable conversion loop."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dpseg.data.layout import LayoutInfo, PreparedWriter
from dpseg.data.prepare.resize import resize_nearest
from dpseg.errors import UserError

ON_ERROR = ("stop", "skip")


def id_lookup(ids_file: str, num_classes: int, size: int, ignore: int, dtype=np.uint8) -> np.ndarray:
    """Raw id -> train id table from `prepare/ids/<ids_file>` (raw ids in train-id order)."""
    import json
    from importlib import resources

    raw_ids = json.loads(resources.files("dpseg.data.prepare").joinpath("ids", ids_file).read_text())
    if len(raw_ids) != num_classes:
        raise RuntimeError(f"ids/{ids_file} lists {len(raw_ids)} ids, expected {num_classes}")
    lut = np.full(size, ignore, dtype=dtype)
    lut[raw_ids] = np.arange(num_classes)
    return lut


class BadFile(Exception):
    """A raw file that is missing or unreadable; `path` is what the user must fix."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class RawLayoutError(UserError):
    """The --src folder does not look like the official download of the dataset."""


@dataclass
class Item:
    split: str
    id: str
    image: Path
    label: Callable[[], np.ndarray]  # decodes the raw annotation to train ids
    max_short_side: int | None = None  # SED shrinks A-847 so its short side is <= 512


@dataclass
class Report:
    info: LayoutInfo
    written: int = 0
    resumed: int = 0
    skipped: list[dict] = field(default_factory=list)


def read_image(path: Path) -> tuple[Image.Image, bytes, str]:
    """Fully decoded RGB image, its file bytes and extension; truncated or non-image files
    raise `BadFile` here rather than later in a training run."""
    if not path.is_file():
        raise BadFile(path, "image file is missing")
    try:
        data = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
        raise BadFile(path, f"not a readable image ({err})") from None
    # JPEG/PNG files are copied byte for byte (no re-encoding loss; readers convert to RGB);
    # any other format is re-encoded as PNG
    ext = {"JPEG": ".jpg", "PNG": ".png"}.get(image.format or "", "")
    if not ext:
        data, ext = b"", ".png"
    return image.convert("RGB"), data, ext


def read_label_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise BadFile(path, "annotation file is missing")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise BadFile(path, f"not a readable annotation image ({err})") from None
    return image


def indexed_label(path: Path, max_value: int) -> np.ndarray:
    """An 8-bit single-channel ('L' or palette 'P') annotation as integer indices."""
    image = read_label_image(path)
    if image.mode not in ("L", "P"):
        raise BadFile(path, f"expected an 8-bit index PNG (mode L or P), got mode {image.mode}")
    array = np.asarray(image)
    if array.max(initial=0) > max_value:
        raise BadFile(path, f"holds value {int(array.max())}, above the largest class index {max_value}")
    return array


def first_existing(candidates: Iterable[Path], what: str, hint: str) -> Path:
    candidates = list(candidates)
    for path in candidates:
        if path.exists():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise RawLayoutError(f"cannot find {what} (looked at {tried}); {hint}")


def find_root(src: Path, relative: list[str], marker: str, hint: str) -> Path:
    """The dataset root inside --src: --src itself or one of the usual sub-folders."""
    if not src.is_dir():
        raise RawLayoutError(f"--src {str(src)!r} does not exist or is not a folder; {hint}")
    for rel in ["", *relative]:
        root = src / rel if rel else src
        if (root / marker).exists():
            return root
    looked = ", ".join(str(src / r) if r else str(src) for r in ["", *relative])
    raise RawLayoutError(f"no {marker!r} under {looked}; {hint}")


def image_for(folder: Path, stem: str) -> Path:
    for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG"):
        path = folder / f"{stem}{ext}"
        if path.exists():
            return path
    return folder / f"{stem}.jpg"  # missing: reported by read_image with this name


def convert_item(item: Item) -> tuple[Image.Image | bytes, str, np.ndarray]:
    image, data, ext = read_image(item.image)
    label = item.label()
    if label.shape != (image.height, image.width):
        raise BadFile(item.image, f"image is {image.width}x{image.height} but its annotation is "
                                  f"{label.shape[1]}x{label.shape[0]}")
    if item.max_short_side and min(image.size) > item.max_short_side:
        image, label = _shrink(image, label, item.max_short_side)
        return image, ".jpg", label
    return (data if data else image), ext, label


def _shrink(image: Image.Image, label: np.ndarray, short: int) -> tuple[Image.Image, np.ndarray]:
    w, h = image.size
    size = (round(w / h * short), short) if w >= h else (short, round(h / w * short))
    # labels as SED (OpenCV INTER_NEAREST indexing, byte-equal); the image with Pillow's bilinear
    # (docs/data.md: how it differs from SED's OpenCV INTER_LINEAR + JPEG quality 75)
    return image.resize(size, Image.BILINEAR), resize_nearest(label, size[1], size[0])


def run_items(
    writer: PreparedWriter,
    items: list[Item],
    on_error: str = "stop",
    progress: bool = True,
    workers: int = 1,
    extra: dict | None = None,
    description: str = "prepare",
) -> Report:
    """Convert every item not already done; a bad file stops the run (naming the file and
    the way out) or, with on_error="skip", is recorded in dataset.json and reported."""
    if on_error not in ON_ERROR:
        raise UserError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    writer.begin()
    todo = [it for it in items if not writer.is_done(it.split, it.id)]
    report_resumed = len(items) - len(todo)
    skipped: list[dict] = []
    written = 0

    def work(item: Item) -> dict | None:
        try:
            image, ext, label = convert_item(item)
        except BadFile as err:
            return {"split": item.split, "id": item.id, "file": err.path, "reason": err.reason}
        try:
            writer.write_item(item.split, item.id, image, ext, label)
            return None
        except OSError as err:  # disk full, permissions: not the item's fault, so always stop
            raise UserError(f"cannot write into {writer.root}: {err}") from None
        except ValueError as err:  # a label outside the vocabulary: the converter's own check
            return {"split": item.split, "id": item.id, "file": str(item.image), "reason": str(err)}

    bar = tqdm(total=len(todo), desc=description, unit="img", disable=not progress, leave=False)
    pool = ThreadPoolExecutor(max_workers=max(workers, 1))
    try:
        for problem in pool.map(work, todo):
            bar.update(1)
            if problem is None:
                written += 1
            elif on_error == "stop":
                raise UserError(
                    f"{problem['file']}: {problem['reason']} (item {problem['split']}/{problem['id']}); "
                    "fix or remove that file and rerun to resume, or pass --on-error skip"
                )
            else:
                skipped.append(problem)
    finally:  # on any stop, drop the queued items instead of converting them all first
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()

    bad = {(p["split"], p["id"]) for p in skipped}
    splits: dict[str, list[str]] = {}
    for item in items:
        splits.setdefault(item.split, [])
        if (item.split, item.id) not in bad:
            splits[item.split].append(item.id)
    by_split: dict[str, list[dict]] = {}
    for problem in skipped:
        by_split.setdefault(problem["split"], []).append(problem)
    info = writer.finish(splits, by_split, extra)
    return Report(info=info, written=written, resumed=report_resumed, skipped=skipped)
