"""Overlay shards: the refined prompts of each evaluated image (pass II), kept as data.

    OUT/overlays/overlays.json         the settings every shard was made with
    OUT/overlays/overlay-000000.tar    webdataset: one sample per image, key = image id
        <key>.json            {"id", "classes", "class_ids", "names", "areas", "counts", "settings"}
        <key>.embedding.npy   (K, D) float16   K = sum(counts): the crops' global embeddings
        <key>.pooled_4.npy    (K, C_4) float16 (and pooled_8, pooled_16)

`classes` index the evaluated vocabulary (what the model saw), `class_ids` the dataset's label
space. A shard is written to a temporary name and renamed, so a shard that exists is whole;
the bank is never touched. Arrays are plain .npy read with allow_pickle=False.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from dpseg.clip.image import PROMPT_STRIDES
from dpseg.errors import UserError
from dpseg.io import atomic_write_bytes, atomic_write_json
from dpseg.refine import Refinement

SETTINGS_FILE = "overlays.json"
FEATURES = ("embedding", *(f"pooled_{s}" for s in PROMPT_STRIDES))


def shard_name(index: int) -> str:
    return f"overlay-{index:06d}.tar"


def sample_key(image_id: str) -> str:
    # webdataset splits a member name at its first dot: ids must not contain one
    return image_id.replace("%", "%25").replace(".", "%2E")


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class OverlayWriter:
    """Writes overlay shards into `root`; `settings` must equal those of shards already there."""

    def __init__(self, root: str | os.PathLike, settings: dict):
        self.root = Path(root)
        self.settings = settings
        existing = self.root / SETTINGS_FILE
        if existing.is_file():
            previous = json.loads(existing.read_text())
            if previous != settings:
                raise UserError(
                    f"{self.root} holds overlays made with other settings; choose another --out or delete "
                    f"{self.root} (differs in: {', '.join(_diff(previous, settings))})"
                )
        else:
            atomic_write_json(existing, settings)

    def exists(self, index: int) -> bool:
        return (self.root / shard_name(index)).is_file()

    def write_shard(self, index: int, items: list[tuple[str, Refinement, dict]]) -> Path:
        """`items`: (image id, its refinement, extra json fields such as class_ids and names)."""
        import webdataset as wds

        path = self.root / shard_name(index)
        buf = io.BytesIO()  # a shard holds a few images' prompts: built in memory, written whole
        writer = wds.TarWriter(buf)
        for image_id, ref, extra in items:
            meta = {
                "id": image_id,
                "classes": ref.classes.tolist(),
                "areas": ref.areas.tolist(),
                "counts": ref.counts.tolist(),
                **extra,
                "settings": self.settings,
            }
            sample = {
                "__key__": sample_key(image_id),
                "json": json.dumps(meta).encode(),
                "embedding.npy": _npy(ref.embedding.numpy().astype(np.float16)),
            }
            for s in PROMPT_STRIDES:
                sample[f"pooled_{s}.npy"] = _npy(ref.pooled[s].numpy().astype(np.float16))
            writer.write(sample)
        writer.close()
        atomic_write_bytes(path, buf.getvalue())
        return path


class OverlayReader:
    """Random access by image id over every shard of an overlays folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        settings = self.root / SETTINGS_FILE
        if not settings.is_file():
            raise UserError(
                f"{self.root} holds no overlays ({SETTINGS_FILE} missing); write them with "
                f"`dpseg eval --passes 2 --out DIR` and pass DIR/overlays"
            )
        self.settings = json.loads(settings.read_text())
        self._tars: dict[Path, tarfile.TarFile] = {}
        self.index: dict[str, tuple[Path, dict[str, tarfile.TarInfo]]] = {}
        for path in sorted(self.root.glob("overlay-*.tar")):
            try:
                tar = tarfile.open(path, "r:")
                members = tar.getmembers()
            except (tarfile.TarError, OSError) as err:
                raise UserError(
                    f"overlay shard {path} is unreadable ({err}); delete it and rerun the eval that wrote it"
                ) from None
            self._tars[path] = tar
            for m in members:
                key, _, ext = m.name.partition(".")
                self.index.setdefault(key, (path, {}))[1][ext] = m

    def __contains__(self, image_id: str) -> bool:
        return sample_key(image_id) in self.index

    def ids(self) -> list[str]:
        return [json.loads(self._read(k, "json"))["id"] for k in self.index]

    def _read(self, key: str, ext: str) -> bytes:
        path, members = self.index[key]
        return self._tars[path].extractfile(members[ext]).read()

    def meta(self, image_id: str) -> dict:
        return json.loads(self._read(sample_key(image_id), "json"))

    def read(self, image_id: str) -> Refinement:
        key = sample_key(image_id)
        if key not in self.index:
            raise UserError(
                f"{self.root} has no overlay for image {image_id!r}; rerun `dpseg eval --passes 2` "
                "on this dataset and split to write them"
            )
        meta = json.loads(self._read(key, "json"))

        def array(name: str) -> torch.Tensor:
            data = np.load(io.BytesIO(self._read(key, f"{name}.npy")), allow_pickle=False)
            return torch.from_numpy(data.astype(np.float32))

        return Refinement(
            classes=torch.tensor(meta["classes"], dtype=torch.int64),
            areas=torch.tensor(meta["areas"], dtype=torch.int64),
            counts=torch.tensor(meta["counts"], dtype=torch.int64),
            embedding=array("embedding"),
            pooled={s: array(f"pooled_{s}") for s in PROMPT_STRIDES},
        )

    def close(self) -> None:
        for tar in self._tars.values():
            tar.close()


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) or ["(nothing)"]
