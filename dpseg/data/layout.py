"""The prepared layout every dataset is converted to, and its atomic, resumable writer.

    OUT/
      dataset.json              written last: its presence means "complete"
      images/<split>/<id>.<jpg|png>
      labels/<split>/<id>.png   uint8 train ids, ignore 255           (< 255 classes)
      labels/<split>/<id>.tif   uint16 train ids, ignore 65535        (A-847, PC-459)
      splits/<split>.txt        the ids of a split, one per line, sorted
      .prepare-state.json       only while incomplete: what is being written, for resuming

Every file goes through a temporary name and `os.replace`, so a killed run leaves whole
files only; an item counts as done when its label exists (the label is written after its
image), which is what makes a rerun resume.
"""

from __future__ import annotations

from shlex import quote
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, features

from dpseg.errors import UserError
from dpseg.io import atomic_write_bytes, atomic_write_json, current_umask

FORMAT = "dpseg-prepared"
VERSION = 1
META = "dataset.json"
STATE = ".prepare-state.json"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class LayoutError(UserError):
    """A prepared-dataset folder that is missing, incomplete or holds another dataset."""


def label_format(num_classes: int) -> tuple[np.dtype, int, str]:
    """(dtype, ignore value, file extension) for a vocabulary size (SED's convention)."""
    if num_classes < 255:
        return np.dtype(np.uint8), 255, ".png"
    return np.dtype(np.uint16), 65535, ".tif"


@dataclass
class LayoutInfo:
    root: Path
    dataset: str
    vocabulary: str
    num_classes: int
    ignore_index: int
    label_dtype: str
    splits: dict[str, list[str]]
    skipped: dict[str, list[dict]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def image_path(self, split: str, item_id: str) -> Path:
        folder = self.root / "images" / split
        for ext in IMAGE_EXTS:
            if (path := folder / f"{item_id}{ext}").exists():
                return path
        raise LayoutError(
            f"{folder / item_id}.* is missing from prepared dataset {str(self.root)!r}; "
            f"rerun `dpseg data prepare` to repair it"
        )

    def label_path(self, split: str, item_id: str) -> Path:
        return self.root / "labels" / split / f"{item_id}{label_format(self.num_classes)[2]}"


def atomic_save_image(path: Path, image: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; other users must read a dataset
        image.save(tmp, **options)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_layout(root: str | Path) -> LayoutInfo:
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(
            f"prepared dataset folder {str(root)!r} does not exist; create it with "
            f"`dpseg data prepare NAME --src RAW --out {quote(str(root))}` or `dpseg data synth --out {quote(str(root))}`"
        )
    meta_path = root / META
    if not meta_path.is_file():
        hint = (
            "a previous run was interrupted: rerun the same command to resume"
            if (root / STATE).exists()
            else "it is not a prepared dataset"
        )
        raise LayoutError(f"{str(root)!r} has no {META} ({hint})")
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        splits = {}
        for split in meta["splits"]:
            ids_path = root / "splits" / f"{split}.txt"
            splits[split] = [line for line in ids_path.read_text("utf-8").splitlines() if line]
        return LayoutInfo(
            root=root,
            dataset=meta["dataset"],
            vocabulary=meta["vocabulary"],
            num_classes=int(meta["num_classes"]),
            ignore_index=int(meta["ignore_index"]),
            label_dtype=meta["label_dtype"],
            splits=splits,
            skipped=meta.get("skipped", {}),
            extra=meta.get("extra", {}),
        )
    except PermissionError as err:  # a healthy dataset this user may not read: never advise deleting it
        raise LayoutError(
            f"cannot read {err.filename or str(root)!r} (permission denied); ask its owner for read access "
            f"(files are written with the umask's mode, 0644 under umask 022)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LayoutError(f"prepared dataset {str(root)!r} is damaged ({err}); delete it and prepare again") from None


class PreparedWriter:
    """Writes one dataset into the layout. `settings` identify the run: resuming with other
    settings (another dataset, image size, seed...) is refused instead of mixing outputs."""

    def __init__(self, out: str | Path, dataset: str, vocabulary: str, num_classes: int, settings: dict | None = None):
        self.root = Path(out)
        self.dataset, self.vocabulary, self.num_classes = dataset, vocabulary, num_classes
        self.dtype, self.ignore, self.label_ext = label_format(num_classes)
        self.settings = {"dataset": dataset, **(settings or {})}

    # -- state ---------------------------------------------------------------------------
    def begin(self) -> None:
        """Start or resume. A folder that already holds this dataset (finished or
        interrupted, same settings) is resumed: done items are kept, the rest written."""
        self.check()
        atomic_write_json(self.root / STATE, self.settings, indent=1, sync=False)

    def check(self) -> None:
        """Refuse an --out that holds something else, before any slow work or any write."""
        if self.root.exists() and not self.root.is_dir():
            raise LayoutError(f"--out {str(self.root)!r} is a file, not a folder")
        previous = self._previous_settings()
        if previous is None and self.root.is_dir() and any(self.root.iterdir()):
            raise LayoutError(
                f"--out {str(self.root)!r} is not empty and is not a prepared dataset; choose an empty or new folder"
            )
        if previous is not None and previous != self.settings:
            raise LayoutError(
                f"{str(self.root)!r} already holds a prepared dataset with other settings ({previous}); "
                "rerun with those settings to resume it, or choose another --out"
            )

    def _previous_settings(self) -> dict | None:
        for name, key in ((STATE, None), (META, "settings")):
            path = self.root / name
            if path.exists():
                try:
                    data = json.loads(path.read_text("utf-8"))
                except PermissionError:
                    raise LayoutError(
                        f"cannot read {str(path)!r} (permission denied); choose another --out or ask "
                        f"its owner for access"
                    ) from None
                except (OSError, ValueError) as err:
                    raise LayoutError(
                        f"{str(path)!r} is unreadable ({err}); delete {str(self.root)!r} and prepare again"
                    ) from None
                return data.get(key) if key else data
        return None

    # -- items ---------------------------------------------------------------------------
    def label_path(self, split: str, item_id: str) -> Path:
        return self.root / "labels" / split / f"{item_id}{self.label_ext}"

    def image_path(self, split: str, item_id: str, ext: str) -> Path:
        return self.root / "images" / split / f"{item_id}{ext}"

    def is_done(self, split: str, item_id: str) -> bool:
        if not self.label_path(split, item_id).exists():
            return False
        return any(self.image_path(split, item_id, ext).exists() for ext in IMAGE_EXTS)

    def write_item(self, split: str, item_id: str, image: Image.Image | bytes, ext: str, label: np.ndarray) -> None:
        """`image` is a PIL image (encoded as `ext`: .png, or .jpg at quality 95) or the
        bytes of an already valid file with that extension (copied: no re-encoding loss)."""
        self.check_label(label, item_id)
        for other in IMAGE_EXTS:  # an interrupted run may have left another format behind
            if other != ext:
                self.image_path(split, item_id, other).unlink(missing_ok=True)
        target = self.image_path(split, item_id, ext)
        if isinstance(image, bytes):
            atomic_write_bytes(target, image, sync=False)
        elif ext == ".png":
            atomic_save_image(target, image.convert("RGB"), format="PNG")
        else:
            atomic_save_image(target, image.convert("RGB"), format="JPEG", quality=95)
        atomic_save_image(
            self.label_path(split, item_id), Image.fromarray(label.astype(self.dtype)), **self._label_options()
        )

    def _label_options(self) -> dict:
        if self.label_ext == ".png":
            return {"format": "PNG"}
        # deflate shrinks uint16 label maps ~30x; it needs Pillow built with libtiff
        return (
            {"format": "TIFF", "compression": "tiff_adobe_deflate"} if features.check("libtiff") else {"format": "TIFF"}
        )

    def check_label(self, label: np.ndarray, item_id: str) -> None:
        # a converter bug must not produce labels that silently alias other classes
        if label.ndim != 2:
            raise ValueError(f"{item_id}: label map must be 2-D, got shape {label.shape}")
        values = np.unique(label)
        bad = values[(values >= self.num_classes) & (values != self.ignore)]
        if bad.size:
            raise ValueError(
                f"{item_id}: label values {bad[:5].tolist()} are neither train ids (< {self.num_classes}) "
                f"nor ignore ({self.ignore})"
            )

    # -- end -----------------------------------------------------------------------------
    def finish(
        self, splits: dict[str, list[str]], skipped: dict[str, list[dict]], extra: dict | None = None
    ) -> LayoutInfo:
        for split, ids in splits.items():
            atomic_write_bytes(
                self.root / "splits" / f"{split}.txt", "".join(f"{i}\n" for i in sorted(ids)).encode(), sync=False
            )
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dataset": self.dataset,
            "vocabulary": self.vocabulary,
            "num_classes": self.num_classes,
            "ignore_index": self.ignore,
            "label_dtype": self.dtype.name,
            "splits": {split: len(ids) for split, ids in splits.items()},
            "skipped": skipped,
            "settings": self.settings,
            "extra": extra or {},
        }
        atomic_write_json(self.root / META, meta, indent=1, sync=False)
        (self.root / STATE).unlink(missing_ok=True)
        return read_layout(self.root)
