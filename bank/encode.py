"""Prompt features: the frozen prompt tower of a CLIP encoder applied to bank images, and
`bank encode` (a new features group from the stored images, no regeneration)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from bank.store import FEATURE_NAMES, BankStore, ShardReader, decode_png, feature_group
from dpseg.clip import load_clip
from dpseg.clip.image import PROMPT_STRIDES


class PromptEncoder:
    """uint8 images (B, H, W, 3) -> {embedding (B, D), pooled_4/8/16 (B, C_l)} as float16 numpy.

    Images are resized to `encode_size` first: by default the segmenter's input size (the
    encoder's `image_size`: 768 for convnext-b/l), because paper §5.2 makes prompts at the size
    the segmenter sees, so the pooled stride-4/8/16 features describe the same scale as the
    image features they are compared with. 320 (the tower's native size) is the ablation."""

    def __init__(self, name: str, weights: str | None = "default", device: str = "cpu", encode_size: int | None = None):
        from dpseg.clip.encoders import ENCODERS
        from dpseg.errors import UserError

        spec = ENCODERS.get(name)
        size = int(encode_size or spec.image_size)
        if size < 32 or size % 32:
            raise UserError(f"--encode-size must be a positive multiple of 32 (the tower's stride), got {size}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # "random" weights are the same in every process and rank
            towers = load_clip(name, weights, device)
        self.name = name
        self.encode_size = size
        self.group = feature_group(name, size)  # the features group these features belong to
        self.device = torch.device(device)
        self.tower = towers.prompt
        del towers  # the trainable image tower and the text tower are not needed here
        from dpseg.clip.encoders import weights_digest

        resolved = self.weights_of(name, weights)
        self.info = {
            "encoder": name,
            "weights": str(resolved),
            "weights_sha256": weights_digest(resolved),
            "encode_size": size,
            "prompt_size": size,
            "embed_dim": self.tower.embed_dim,
            "channels": {str(s): self.tower.channels_at(s) for s in PROMPT_STRIDES},
        }

    @staticmethod
    def weights_of(name: str, weights) -> str:
        from dpseg.clip.encoders import ENCODERS, resolve_weights

        return resolve_weights(ENCODERS.get(name), weights) or "random"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()
        x = torch.as_tensor(images).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        x = self.tower.normalize(self.tower.resize(x, self.encode_size))
        autocast = (
            torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        with autocast:
            out = self.tower.encode_prompts(x)
        feats = {"embedding": out.embedding, **{f"pooled_{s}": out.pooled[s] for s in PROMPT_STRIDES}}
        return {k: v.float().cpu().numpy().astype(np.float16) for k, v in feats.items()}

    def empty(self) -> dict[str, np.ndarray]:
        dims = {"embedding": self.info["embed_dim"], **{f"pooled_{s}": c for s, c in self.info["channels"].items()}}
        return {name: np.zeros((0, dims[name]), np.float16) for name in FEATURE_NAMES}


def encode_shards(
    store: BankStore, encoder: PromptEncoder, shards: Sequence[str], batch_size: int, progress: bool = True
) -> int:
    """Writes the feature part of each shard from its stored images; returns images encoded."""
    from tqdm.auto import tqdm

    done = 0
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PNG decoding releases the GIL
        for shard in tqdm(shards, desc=f"encode {encoder.name}", unit="shard", disable=not progress):
            with ShardReader(store.root / shard) as reader:
                keys = [k for k, files in reader.members.items() if "png" in files]
                chunks: dict[str, list[np.ndarray]] = {n: [] for n in FEATURE_NAMES}
                for i in range(0, len(keys), batch_size):
                    blobs = [(reader.read(k, "png"), f"{shard}: entry {k}") for k in keys[i : i + batch_size]]
                    images = np.stack(list(pool.map(lambda b: decode_png(*b), blobs)))
                    for name, value in encoder(images).items():
                        chunks[name].append(value)
            feats = {n: np.concatenate(v) for n, v in chunks.items()} if keys else encoder.empty()
            store.write_part(encoder.group, shard, keys, feats, encoder.info)
            done += len(keys)
    return done


def missing_parts(store: BankStore, group: str) -> list[str]:
    """Shards whose feature part for `group` is missing or unreadable."""
    return [s for s in store.shards() if store.part_keys(group, s) is None]


def record_encoder(config: dict, info: dict) -> None:
    """bank.json's `encoders` entry: one per encoder name (its weights, dims), listing the sizes
    its features groups were encoded at. `prompt_size`/`encode_size` keep the first size;
    `environment` is the thread count and library versions of the latest encoding (the bits of
    float features depend on them)."""
    from dpseg.reproducibility import environment

    entry = config.setdefault("encoders", {}).setdefault(info["encoder"], dict(info))
    entry.update({k: v for k, v in info.items() if k not in ("encode_size", "prompt_size")})
    entry["environment"] = environment()
    entry["encode_sizes"] = sorted(set(entry.get("encode_sizes", [])) | {int(info["encode_size"])})


def encode_bank(
    root,
    encoder_name: str,
    weights: str | None = "default",
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
    state=None,
    encoder: PromptEncoder | None = None,
    encode_size: int | None = None,
) -> dict[str, Any]:
    """`dpseg bank encode`: features for `encoder_name` at `encode_size` from the stored images
    (resumable, split over `accelerate launch` ranks), then merged into features.zarr. `encoder`
    may be passed in already loaded (benchmarks)."""
    from bank.merge import merge
    from bank.runtime import distributed_state

    store = BankStore(root).require()
    config = store.read_config()
    state = state or distributed_state(device)
    device = str(state.device) if state.device.type == "cuda" else "cpu"
    if encoder is None:
        encoder = PromptEncoder(encoder_name, weights, device, encode_size)
    check_encoder_compatible(config, encoder.info)
    todo = missing_parts(store, encoder.group)
    state.wait_for_everyone()
    mine = todo[state.process_index :: state.num_processes]
    encoded = encode_shards(store, encoder, mine, batch_size, progress and state.is_main_process)
    state.wait_for_everyone()
    report = {
        "encoder": encoder_name,
        "encode_size": encoder.encode_size,
        "group": encoder.group,
        "shards": len(todo),
        "images": encoded,
    }
    if state.is_main_process:
        with store.lock():
            config = store.read_config()
            record_encoder(config, encoder.info)
            store.write_config(config)
        report["merge"] = merge(store)
    return report


def check_encoder_compatible(config: dict, info: dict) -> None:
    from dpseg.clip.encoders import matches_recorded
    from dpseg.errors import UserError

    known = config.get("encoders", {}).get(info["encoder"])
    if known and not matches_recorded(info["weights"], known.get("weights"), known.get("weights_sha256")):
        raise UserError(
            f"this bank's {info['encoder']!r} features were computed with weights {known['weights']!r}, "
            f"not {info['weights']!r}; "
            f"pass --encoder-weights {known['weights']} or encode into a copy of the bank"
        )
