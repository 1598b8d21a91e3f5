"""Reader API for training and evaluation: class names + encoder id -> prototype tensors.

    bank = Bank("out/bank")
    protos = bank.prototypes(class_names, "convnext-b", encode_size=768)   # in the order of class_names
    protos.embedding   # (N, M, D) float32
    protos.pooled[8]   # (N, M, C_8)
    bank.encode_size("convnext-b")   # the size its prompt images were encoded at

Whatever cannot be read (a missing or garbled chunk, a missing array) is a one-line error
naming the command that repairs it; the reader never returns NaN or a fill value.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from shlex import quote

import numpy as np
import torch

from bank.store import FEATURE_NAMES, BankStore, feature_group, split_group
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

    def groups(self) -> dict[str, tuple[str, int]]:
        """features.zarr's groups: `<encoder>@<size>` -> (encoder, encode size)."""
        import zarr

        if not self.store.features_path.is_dir():
            return {}
        try:
            root = zarr.open_group(str(self.store.features_path), mode="r")
            names = [name for name, _ in root.groups()]
        except Exception as err:
            raise UserError(
                f"{self.store.features_path} is unreadable ({type(err).__name__}); repair it with: "
                f"{self.encode_command(next(iter(self.config.get('encoders', {})), 'ENCODER'))}"
            ) from None
        out = {}
        for name in names:
            try:
                out[name] = split_group(name)
            except ValueError:
                continue  # not ours
        return dict(sorted(out.items()))

    def encoders(self) -> list[str]:
        """Encoder names with features (each may have several encode sizes)."""
        return sorted({name for name, _ in self.groups().values()})

    def encoder_info(self, encoder: str) -> dict:
        """The bank's record of `encoder` (weights, their digest, ...); a one-line error naming the
        command that adds it when the bank has none."""
        info = (self.config.get("encoders") or {}).get(encoder)
        if info is None:
            have = ", ".join(sorted(self.config.get("encoders") or {})) or "none"
            raise UserError(
                f"bank {self.root} has no features for encoder {encoder!r} (it has: {have}); "
                f"add them with: {self.encode_command(encoder)}"
            )
        return info

    def encode_sizes(self, encoder: str) -> list[int]:
        return sorted(size for name, size in self.groups().values() if name == encoder)

    def encode_size(self, encoder: str) -> int:
        """The size to read `encoder`'s prompt features at when the caller names none: the
        encoder's segmentation input size (paper §5.2 encodes prompts at the size the segmenter
        sees). A bank without features at that size is refused, naming the command that adds
        them; a caller that wants another size passes it explicitly (`encode_size=`)."""
        from dpseg.clip.encoders import ENCODERS

        sizes = self.encode_sizes(encoder)
        if not sizes:
            self._missing_encoder(encoder, None)
        default = ENCODERS.get(encoder).image_size if encoder in ENCODERS else None
        if default in sizes or (default is None and len(sizes) == 1):
            return default or sizes[0]
        if len(sizes) == 1:  # e.g. a bank encoded at the tower's native 320 before sizes were recorded per group
            raise UserError(
                f"bank {self.root} holds {encoder!r} prompt features encoded at {sizes[0]} px only, but the "
                f"segmenter's input is {default} px; re-encode them with: {self.encode_command(encoder, default)} "
                f"(or pass --encode-size {sizes[0]} to use them at {sizes[0]} px)"
            )
        raise UserError(
            f"bank {self.root} holds {encoder!r} features at encode sizes {sizes}; pass encode_size= one of them"
        )

    def encode_command(self, encoder: str, encode_size: int | None = None) -> str:
        size = f" --encode-size {encode_size}" if encode_size else ""
        return f"dpseg bank encode {quote(str(self.root))} --encoder {quote(encoder)}{size}"

    def _missing_encoder(self, encoder: str, encode_size: int | None):
        have = ", ".join(self.groups()) or "none"
        raise UserError(
            f"bank {self.root} has no features for encoder {encoder!r}"
            f"{'' if encode_size is None else f' at encode size {encode_size}'} (it has: {have}); "
            f"add them with: {self.encode_command(encoder, encode_size)}"
        )

    def _group(self, encoder: str, encode_size: int | None = None):
        import zarr

        sizes = self.encode_sizes(encoder)
        if encode_size is None:
            encode_size = self.encode_size(encoder)
        elif int(encode_size) not in sizes:
            if sizes:
                raise UserError(
                    f"bank {self.root}: the {encoder!r} prompt images were encoded at {', '.join(map(str, sizes))} px, "
                    f"the model asks for {encode_size} px; add features at that size with: "
                    f"{self.encode_command(encoder, encode_size)}"
                )
            self._missing_encoder(encoder, encode_size)
        group = feature_group(encoder, encode_size)
        try:
            return zarr.open_group(str(self.store.features_path / group), mode="r"), int(encode_size)
        except Exception as err:
            raise self._damaged(group, encoder, int(encode_size), err) from None

    def _check_lost_valid(self, rows: list[int], group, m: int, where: str, encoder: str, size: int) -> None:
        """Rows `valid` calls empty but that hold features: a lost `valid` chunk, not missing prompts."""
        if not rows:
            return
        try:
            values = group["embedding"].oindex[np.unique(rows), :m]
        except Exception as err:
            raise self._damaged(f"{where}/embedding", encoder, size, err) from None
        if np.isfinite(values).any():
            raise self._damaged(f"{where}/valid", encoder, size)

    def _damaged(self, where: str, encoder: str, encode_size: int, err: BaseException | None = None) -> UserError:
        why = f" ({type(err).__name__})" if err is not None else ""
        return UserError(
            f"bank {self.root}: features.zarr/{where} is damaged{why}; repair it with: "
            f"{self.encode_command(encoder, encode_size)} (or the same `dpseg bank build` command)"
        )

    def build_command(self, encoder: str, templates: int) -> str:
        g = self.config["generator"]
        return (
            f"dpseg bank build --out {quote(str(self.root))} --generator {quote(g['id'])} --encoder {encoder} "
            f"--templates {templates} "
            f"--seed {self.config['seed']} --vocab VOCAB (a vocabulary or file that lists them)"
        )

    def prototypes(
        self,
        class_names: Sequence[str],
        encoder: str,
        templates: int | None = None,
        device: str | torch.device = "cpu",
        encode_size: int | None = None,
    ) -> Prototypes:
        """Rows in the order of `class_names` (synonyms "a, b" are looked up by their first name).
        An entry that failed its image check is filled with the mean of its category's valid
        templates (`filled` marks them); a category with no valid entry is an error. With
        `encode_size`, a features group encoded at another size is refused (the one-line fix
        says how to add that size)."""
        group, size = self._group(encoder, encode_size)
        where = feature_group(encoder, size)
        try:
            categories = list(group.attrs["categories"])
            have = int(group.attrs["templates"])
        except Exception as err:
            raise self._damaged(where, encoder, size, err) from None
        row_of = {c: i for i, c in enumerate(categories)}
        m = have if templates is None else int(templates)
        if m < 1:
            raise UserError(f"templates must be between 1 and the {have} bank {self.root} holds, got {m}")
        if m > have:
            raise UserError(
                f"bank {self.root} holds {have} templates per class, {m} were asked for; extend it with: "
                f"{self.build_command(encoder, m)}"
            )
        wanted = [primary_name(n) for n in class_names]
        try:
            valid_all = group["valid"][:, :m]
        except Exception as err:
            raise self._damaged(f"{where}/valid", encoder, size, err) from None
        missing = [
            n for n, p in zip(class_names, wanted, strict=True) if p not in row_of or not valid_all[row_of[p]].any()
        ]
        if missing:
            self._check_lost_valid(
                [row_of[primary_name(n)] for n in missing if primary_name(n) in row_of], group, m, where, encoder, size
            )
            shown = ", ".join(repr(n) for n in missing[:20]) + (
                f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            )
            raise UserError(
                f"bank {self.root} has no {encoder!r} prompts for {len(missing)} classes: {shown}; add them with: "
                f"{self.build_command(encoder, m)}"
            )
        rows = np.array([row_of[p] for p in wanted], dtype=np.int64)
        unique, inverse = np.unique(rows, return_inverse=True)
        valid = valid_all[unique]
        take = torch.from_numpy(inverse)
        broken = np.flatnonzero(~valid.all(axis=1))  # rare: categories with a failed entry

        def load(name: str) -> torch.Tensor:
            try:
                arr = group[name]
                whole = len(unique) > arr.shape[0] // 2
                raw = arr[:, :m] if whole else arr.oindex[unique, :m]
            except Exception as err:  # a missing array or a chunk that does not decode
                raise self._damaged(f"{where}/{name}", encoder, size, err) from None
            block = torch.from_numpy(raw)
            if whole:
                block = block[torch.from_numpy(unique)]
            if not torch.isfinite(block[torch.from_numpy(valid)]).all():  # a lost chunk reads as its fill value, NaN
                raise self._damaged(f"{where}/{name}", encoder, size)
            for r in broken:
                ok = torch.from_numpy(valid[r])
                block[r, ~ok] = block[r, ok].float().mean(dim=0).to(block.dtype)
            return block[take].to(device=device, dtype=torch.float32)

        with ThreadPoolExecutor(len(FEATURE_NAMES)) as pool:  # the four arrays are read concurrently
            out = dict(zip(FEATURE_NAMES, pool.map(load, FEATURE_NAMES), strict=False))
        return Prototypes(
            names=list(class_names),
            embedding=out["embedding"],
            pooled={s: out[f"pooled_{s}"] for s in PROMPT_STRIDES},
            filled=torch.from_numpy(~valid[inverse]).to(device),
        )
