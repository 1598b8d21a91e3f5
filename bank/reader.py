"""Reader API for training and evaluation: class names + encoder id -> prototype tensors.

    bank = Bank("out/bank")
    protos = bank.prototypes(class_names, "convnext-b")   # in the order of class_names
    protos.embedding   # (N, M, D) float32
    protos.pooled[8]   # (N, M, C_8)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bank.store import FEATURE_NAMES, BankStore
from dpseg.clip.image import PROMPT_STRIDES
from dpseg.clip.templates import primary_name
from dpseg.errors import UserError


@dataclass
class Prototypes:
    names: list[str]  # the class names asked for
    embedding: torch.Tensor  # (N, M, D)
    pooled: dict[int, torch.Tensor]  # stride -> (N, M, C_l)
    filled: torch.Tensor  # (N, M) bool: True where a failed entry was filled with its category's mean


class Bank:
    def __init__(self, root: str | Path):
        self.store = BankStore(root).require()
        self.root = self.store.root
        self.config = self.store.read_config()

    @property
    def generator(self) -> str:
        return self.config["generator"]["id"]

    def encoders(self) -> list[str]:
        import zarr

        if not self.store.features_path.is_dir():
            return []
        root = zarr.open_group(str(self.store.features_path), mode="r")
        return sorted(name for name, _ in root.groups())

    def _group(self, encoder: str):
        import zarr

        if encoder not in self.encoders():
            have = ", ".join(self.encoders()) or "none"
            raise UserError(f"bank {self.root} has no features for encoder {encoder!r} (it has: {have}); "
                            f"add them with: dpseg bank encode {self.root} --encoder {encoder}")
        return zarr.open_group(str(self.store.features_path / encoder), mode="r")

    def build_command(self, encoder: str, templates: int) -> str:
        g = self.config["generator"]
        return (f"dpseg bank build --out {self.root} --generator {g['id']} --encoder {encoder} --templates {templates} "
                f"--seed {self.config['seed']} --vocab VOCAB (a vocabulary or file that lists them)")

    def prototypes(self, class_names: Sequence[str], encoder: str, templates: int | None = None,
                   device: str | torch.device = "cpu") -> Prototypes:
        """Rows in the order of `class_names` (synonyms "a, b" are looked up by their first name).
        An entry that failed its image check is filled with the mean of its category's valid
        templates (`filled` marks them); a category with no valid entry is an error."""
        group = self._group(encoder)
        categories = list(group.attrs["categories"])
        row_of = {c: i for i, c in enumerate(categories)}
        have = int(group.attrs["templates"])
        m = have if templates is None else templates
        if m > have:
            raise UserError(f"bank {self.root} holds {have} templates per class, {m} were asked for; extend it with: "
                            f"{self.build_command(encoder, m)}")
        wanted = [primary_name(n) for n in class_names]
        valid_all = group["valid"][:, :m]
        missing = [n for n, p in zip(class_names, wanted) if p not in row_of or not valid_all[row_of[p]].any()]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise UserError(f"bank {self.root} has no {encoder!r} prompts for {len(missing)} classes: {shown}; add them with: "
                            f"{self.build_command(encoder, m)}")
        rows = np.array([row_of[p] for p in wanted], dtype=np.int64)
        unique, inverse = np.unique(rows, return_inverse=True)
        valid = valid_all[unique]
        take = torch.from_numpy(inverse)
        broken = np.flatnonzero(~valid.all(axis=1))  # rare: categories with a failed entry

        def load(name: str) -> torch.Tensor:
            arr = group[name]
            whole = len(unique) > arr.shape[0] // 2
            block = torch.from_numpy(arr[:, :m] if whole else arr.oindex[unique, :m])
            if whole:
                block = block[torch.from_numpy(unique)]
            for r in broken:
                ok = torch.from_numpy(valid[r])
                block[r, ~ok] = block[r, ok].float().mean(dim=0).to(block.dtype)
            return block[take].to(device=device, dtype=torch.float32)

        with ThreadPoolExecutor(len(FEATURE_NAMES)) as pool:  # the four arrays are read concurrently
            out = dict(zip(FEATURE_NAMES, pool.map(load, FEATURE_NAMES)))
        return Prototypes(
            names=list(class_names), embedding=out["embedding"],
            pooled={s: out[f"pooled_{s}"] for s in PROMPT_STRIDES},
            filled=torch.from_numpy(~valid[inverse]).to(device),
        )
