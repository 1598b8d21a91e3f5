"""`noise:<r>`: a derived generator; each entry is the source bank's image of the same prompt,
blended with Gaussian noise, no regeneration:

    y  = (1 - r) * (2 x - 1) + r * eps,    eps ~ N(0, 1) per pixel and channel
    x' = clip((y + 1) / 2, 0, 1)

x is the source RGB image in [0, 1]; eps is drawn from a torch.Generator seeded with the derived
entry's own seed. r = 0 gives the source image, r = 1 pure noise (mean grey, std 0.5)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bank.generators.base import Generated, Generator, GeneratorSettings, Request
from dpseg.errors import UserError

BLEND = "linear-gaussian-v1"


def blend(image: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """image (3, H, W) in [0, 1] -> the noised image, same shape."""
    eps = torch.randn(image.shape, generator=generator, dtype=torch.float32)
    y = (1.0 - ratio) * (2.0 * image.float() - 1.0) + ratio * eps
    return ((y + 1.0) / 2.0).clamp(0.0, 1.0)


class NoiseGenerator(Generator):
    id = "noise"

    def __init__(self, source: str | Path, ratio: float):
        from bank.merge import read_manifest
        from bank.store import BankStore

        if not 0.0 <= ratio <= 1.0:
            raise UserError(f"--noise must be a ratio in [0, 1], got {ratio}")
        self.source = BankStore(source).require()
        config = self.source.read_config()
        table, _ = read_manifest(self.source)
        self.entries = {r["prompt"]: r for r in table.to_pylist()}
        g = config["generator"]
        super().__init__(
            {
                "source_generator": g["id"],
                "source_settings_hash": g["settings_hash"],
                "source_seed": config["seed"],
                "ratio": float(ratio),
                "blend": BLEND,
            },
            {"device": "cpu", "dtype": "float32", "compile": []},
        )
        self.id = f"noise:{ratio:g}"
        self.ratio = float(ratio)
        self._readers: dict = {}

    @classmethod
    def create(cls, options: GeneratorSettings):
        raise UserError("noise banks are derived: use `dpseg bank derive --from DIR --noise R --out DIR2`")

    def _source_image(self, row) -> tuple[np.ndarray, np.ndarray | None]:
        from PIL import Image

        from bank.store import ShardReader

        reader = self._readers.get(row["shard"])
        if reader is None:
            reader = self._readers.setdefault(row["shard"], ShardReader(self.source.root / row["shard"]))
        from bank.store import decode_png  # a broken PNG is one line naming its shard and entry

        rgb = decode_png(reader.read(row["key"], "png"), f"{reader.path}: entry {row['key']}")
        alpha = None
        if "alpha.png" in reader.members[row["key"]]:
            with Image.open(io.BytesIO(reader.read(row["key"], "alpha.png"))) as im:
                alpha = np.asarray(im.convert("L"))
        return rgb, alpha

    def generate(self, requests: Sequence[Request]) -> Generated:
        images, alphas, failures, size = [], [], [], None
        for r in requests:
            row = self.entries.get(r.prompt)
            if row is None or row["status"] != "ok":
                images.append(None)
                alphas.append(None)
                failures.append("source entry missing" if row is None else f"source entry failed ({row['reason']})")
                continue
            rgb, alpha = self._source_image(row)
            size = rgb.shape[:2]
            x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0
            images.append(blend(x, self.ratio, torch.Generator("cpu").manual_seed(int(r.seed))))
            alphas.append(None if alpha is None else torch.from_numpy(alpha.copy())[None].float() / 255.0)
            failures.append(None)
        size = size or (8, 8)
        images = [torch.full((3, *size), float("nan")) if im is None else im for im in images]
        has_alpha = any(a is not None for a in alphas)
        alpha = torch.stack([torch.ones(1, *size) if a is None else a for a in alphas]) if has_alpha else None
        return Generated(images=torch.stack(images), alpha=alpha, failures=failures)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
