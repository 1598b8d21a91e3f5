"""What an evaluation (or `dpseg segment`) needs before its loop: the checkpoint and what it
records, the bank it must agree with, the dataset and its class subset, and the prompts.

Every mismatch is refused here, in one line, before any slow work."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpseg.errors import UserError
from dpseg.model.prompts import VisualPrompts


def checkpoint_facts(config: dict) -> dict[str, Any]:
    """The facts training recorded in a checkpoint's config.json (`extra`), with fallbacks to the
    model config for checkpoints saved without them (tests, hand-made ones)."""
    extra = config.get("extra") or {}
    bank = extra.get("bank")
    bank_path = bank.get("path") if isinstance(bank, dict) else bank
    encoder = extra.get("encoder")
    encoder_name = encoder.get("name") if isinstance(encoder, dict) else encoder
    recipe = extra.get("recipe") or {}
    return {
        "bank": bank_path or extra.get("bank_path") or recipe.get("bank"),
        "encoder": encoder_name or config["encoder"]["name"],
        "encoder_weights": _weights_id(config.get("encoder_weights") or extra.get("encoder_weights")),
        "encode_size": extra.get("encode_size") or recipe.get("encode_size"),
        "size": extra.get("size") or extra.get("crop_size") or recipe.get("crop_size") or recipe.get("size"),
        "templates": int(config["model"].get("templates", 80)),
        "step": extra.get("step"),
        "class_names": extra.get("class_names"),
    }


def _weights_id(weights) -> str:
    # the bank records random towers as "random"; recipes may say none/None
    return "random" if weights is None or str(weights).lower() in ("none", "random") else str(weights)


def bank_encoder_info(bank, encoder: str, weights: str) -> dict:
    """The bank's record of `encoder`, refused when absent or computed with other weights."""
    info = (bank.config.get("encoders") or {}).get(encoder)
    if info is None:
        have = ", ".join(sorted(bank.config.get("encoders") or {})) or "none"
        raise UserError(
            f"bank {bank.root} has no features for the checkpoint's encoder {encoder!r} (it has: {have}); "
            f"add them with: dpseg bank encode {bank.root} --encoder {encoder}"
        )
    from dpseg.clip.encoders import matches_recorded

    if not matches_recorded(weights, info.get("weights"), info.get("weights_sha256")) and not stands_in(
        info.get("weights"), weights
    ):
        raise UserError(
            f"checkpoint encoder {encoder!r} has weights {weights!r} but bank {bank.root} was encoded with "
            f"{info.get('weights')!r}; pass the bank the checkpoint was trained with (--bank)"
        )
    return info


def stands_in(bank_weights, recorded) -> bool:
    """Whether the bank's weights file may stand in for the checkpoint's recorded one: the recorded
    local file is gone (a checkpoint restored from DVC's run cache records the temporary workspace
    of the run that made it; a checkpoint copied to another machine, its old path) and the bank's
    file exists. load_dpseg then rebuilds the frozen towers from the bank's file and refuses them
    unless their digest is the one the checkpoint recorded, so a wrong file still fails."""
    recorded_path, bank_path = Path(str(recorded)), Path(str(bank_weights))
    return str(recorded).endswith(".safetensors") and not recorded_path.exists() and bank_path.is_file()


def load_prototypes(bank, names: list[str], encoder: str, templates: int, device, encode_size: int | None):
    """Bank prototypes; `encode_size` is passed where the reader knows it (it refuses a group
    encoded at another size)."""
    kwargs = {"templates": templates, "device": device}
    if encode_size is not None and "encode_size" in inspect.signature(bank.prototypes).parameters:
        kwargs["encode_size"] = encode_size
    protos = bank.prototypes(names, encoder, **kwargs)
    return VisualPrompts(protos.embedding, dict(protos.pooled))


def text_prompts(model, names: list[str], cache_dir: str | None) -> tuple[torch.Tensor, str]:
    try:
        from pipeline.text_cache import cached_text_embeddings
    except ImportError:  # pragma: no cover - the cache module is optional
        return model.encode_text(names), "computed"
    return cached_text_embeddings(model, names, cache_dir=cache_dir), "cached"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


@dataclass
class EvalContext:
    model: Any
    text: torch.Tensor | None
    visual: VisualPrompts | None
    dataset: Any
    keep: list[int]
    names: list[str]
    remap: Callable
    device: torch.device
    size: int
    encode_size: int
    templates: int
    encoder: str
    encoder_weights: str
    bank_dir: Path
    bank_generator: str
    text_source: str
    checkpoint_step: Any = None
    extra: dict = field(default_factory=dict)

    def loader(self, batches: list[list[int]], workers: int):
        """Batches of the given dataset indices, read by `workers` processes, in order."""
        from dpseg.data.transforms import collate_eval
        from dpseg.reproducibility import loader_seeding

        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=collate_eval,
            persistent_workers=False,
            **loader_seeding(0),  # eval reads draw nothing random; seeded all the same
        )


def read_facts(path: str) -> tuple[dict, dict]:
    from dpseg.model.checkpoint import read_checkpoint_config

    config = read_checkpoint_config(path)
    return config, checkpoint_facts(config)


def open_checkpoint(path: str, device: torch.device):
    from dpseg.model.checkpoint import load_dpseg

    config, facts = read_facts(path)
    return config, facts, load_dpseg(path, device).eval()


def prepare_context(settings) -> EvalContext:
    from bank.reader import Bank
    from dpseg.data.readers import SegmentationDataset
    from dpseg.data.subsets import remap_labels, resolve_subset
    from dpseg.data.transforms import EvalTransform

    device = resolve_device(settings.device)
    # 1. the facts the checkpoint records (the model loads once they are checked)
    _, facts = read_facts(settings.checkpoint)
    bank_dir = settings.bank or facts["bank"]
    if not bank_dir:
        raise UserError(f"checkpoint {settings.checkpoint} records no bank; pass --bank DIR")
    # 2. bank: same encoder and weights as the checkpoint's towers
    bank = Bank(bank_dir)
    info = bank_encoder_info(bank, facts["encoder"], facts["encoder_weights"])
    encode_size = int(settings.encode_size or facts["encode_size"] or info.get("encode_size") or info["prompt_size"])
    from dpseg.clip.encoders import ENCODERS

    size = int(settings.size or facts["size"] or ENCODERS.get(facts["encoder"]).image_size)
    if size % 32:
        raise UserError(f"model input size {size} must be a multiple of 32; pass --size")
    # 3. dataset and class subset (other classes become ignore)
    dataset = SegmentationDataset(settings.dataset, settings.split, EvalTransform(size))
    keep = resolve_subset(dataset.info, settings.classes)
    names = [dataset.class_names[i] for i in keep]
    from dpseg.model.checkpoint import load_dpseg

    stand_in = info.get("weights") if stands_in(info.get("weights"), facts["encoder_weights"]) else None
    model = load_dpseg(settings.checkpoint, device, encoder_weights=stand_in).eval()

    def remap(label):
        return remap_labels(label, keep, dataset.num_classes, dataset.ignore_index)

    # 4. prompts: text (cached) and the bank's visual prototypes
    cfg = model.cfg
    text, source = text_prompts(model, names, settings.text_cache) if cfg.uses_text else (None, "none")
    visual = None
    if cfg.uses_visual:
        visual = load_prototypes(bank, names, facts["encoder"], cfg.templates, device, encode_size)
    if settings.passes == 2 and visual is None:
        raise UserError(
            f"the checkpoint uses no visual prompts (prompt_mode {cfg.prompt_mode!r}): pass II has "
            "nothing to refine; use --passes 1"
        )
    return EvalContext(
        model=model,
        text=text,
        visual=visual,
        dataset=dataset,
        keep=keep,
        names=names,
        remap=remap,
        device=device,
        size=size,
        encode_size=encode_size,
        templates=cfg.templates,
        encoder=facts["encoder"],
        encoder_weights=facts["encoder_weights"],
        bank_dir=Path(bank_dir),
        bank_generator=bank.generator,
        text_source=source,
        checkpoint_step=facts["step"],
    )
