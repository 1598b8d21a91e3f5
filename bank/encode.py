"""Prompt features: the frozen prompt tower of a CLIP encoder applied to bank images, and
`bank encode` (a new features group from the stored images, no regeneration)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
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
        x = torch.as_tensor(images).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
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


class _StoredImages(torch.utils.data.Dataset):
    """The PNG images of bank shards by flat index, decoded where the DataLoader runs it (worker
    processes). A bad PNG comes back as its one-line message, raised by the main process (an
    exception raised in a worker would reach the user wrapped in the worker's traceback)."""

    def __init__(self, root, items: list[tuple[str, str]]):
        self.root = root
        self.items = items
        self._readers: dict[str, ShardReader] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from dpseg.errors import UserError

        shard, key = self.items[index]
        try:
            if shard not in self._readers:  # opened once per worker process
                self._readers[shard] = ShardReader(self.root / shard)
            return decode_png(self._readers[shard].read(key, "png"), f"{shard}: entry {key}")
        except UserError as err:
            return str(err)

    def __getstate__(self):
        return {"root": self.root, "items": self.items, "_readers": {}}


def _collate_images(images: list):
    bad = next((x for x in images if isinstance(x, str)), None)
    return bad if bad is not None else torch.from_numpy(np.stack(images))


class _PartWriter:
    """Writes feature parts on a thread while the tower encodes the next batches; a full queue
    holds the encoder back (bounded memory), an error surfaces at the next put or at close."""

    def __init__(self, store: BankStore, encoder: PromptEncoder, depth: int = 2):
        import queue
        import threading

        self.store, self.encoder = store, encoder
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bank-part-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.store.write_part(self.encoder.group, *job, self.encoder.info)
                except BaseException as err:  # re-raised in the encoding thread
                    self.error = err

    def put(self, shard: str, keys: list[str], feats: dict[str, np.ndarray]) -> None:
        self._check()
        self.queue.put((shard, keys, feats))

    def close(self, raise_error: bool = True) -> None:
        self.queue.put(None)
        self.thread.join()
        if raise_error:
            self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error


def default_workers() -> int:
    return min(8, max(1, (os.cpu_count() or 1) - 1))


def encode_shards(
    store: BankStore,
    encoder: PromptEncoder,
    shards: Sequence[str],
    batch_size: int,
    progress: bool = True,
    workers: int | None = None,
) -> int:
    """Writes the feature part of each shard from its stored images; returns images encoded.

    A pipeline: `workers` DataLoader processes read and decode the PNGs (into pinned host
    memory on CUDA) while the tower encodes the batch before, and a writer thread saves each
    shard's part as soon as its last batch is encoded. Batches never straddle shards, so every
    image is encoded in the batch it would be in shard by shard: the features are the same bits."""
    from tqdm.auto import tqdm

    from dpseg.errors import UserError

    workers = default_workers() if workers is None else workers
    keys = {}
    for shard in shards:
        with ShardReader(store.root / shard) as reader:
            keys[shard] = [k for k, files in reader.members.items() if "png" in files]
    items = [(shard, k) for shard in shards for k in keys[shard]]
    batches, start = [], 0  # (shard, flat indices); a shard's batches are consecutive
    for shard in shards:
        n = len(keys[shard])
        batches += [(shard, list(range(start + i, start + min(i + batch_size, n)))) for i in range(0, n, batch_size)]
        start += n
    loader = torch.utils.data.DataLoader(
        _StoredImages(store.root, items),
        batch_sampler=[b for _, b in batches],
        num_workers=workers if batches else 0,
        collate_fn=_collate_images,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers and batches else None,
    )
    loaded = iter(loader)  # the worker processes fork before the writer thread starts
    writer = _PartWriter(store, encoder)
    bar = tqdm(total=len(items), desc=f"encode {encoder.name}", unit="img", disable=not progress)
    per_shard = {shard: sum(1 for s, _ in batches if s == shard) for shard in shards}
    try:
        for shard in shards:
            chunks: dict[str, list[np.ndarray]] = {n: [] for n in FEATURE_NAMES}
            for _ in range(per_shard[shard]):
                images = next(loaded)
                if isinstance(images, str):
                    raise UserError(images)
                for name, value in encoder(images).items():
                    chunks[name].append(value)
                bar.update(len(images))
            feats = {n: np.concatenate(v) for n, v in chunks.items()} if keys[shard] else encoder.empty()
            writer.put(shard, keys[shard], feats)
    except BaseException:
        writer.close(raise_error=False)
        raise
    finally:
        bar.close()
    writer.close()
    return len(items)


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
    workers: int | None = None,
) -> dict[str, Any]:
    """`dpseg bank encode`: features for `encoder_name` at `encode_size` from the stored images
    (resumable, split over `accelerate launch` ranks; `workers` PNG-decoding processes per rank,
    default: the cores less one, at most 8), then merged into features.zarr once. `encoder` may
    be passed in already loaded (benchmarks)."""
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
    encoded = encode_shards(store, encoder, mine, batch_size, progress and state.is_main_process, workers)
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
