"""Step 1 of training: every input is checked and every default filled in before any compute,
so a bad recipe fails in a second with one line naming the thing and the fix."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from shlex import quote

from dpseg.errors import UserError

MIXED_PRECISION = ("fp32", "no", "bf16", "fp16", "auto")
RESUME = ("auto", "yes", "no")
CROP_SOURCES = ("truth", "prediction")
CROP_NEGATIVE_CLASSES = ("random", "similar")
# Recipe keys a resumed run may change: they do not alter the trajectory of the weights.
RESUMABLE_CHANGES = {
    "steps",
    "log_every",
    "checkpoint_every",
    "num_workers",
    "resume",
    "val_every",
    "val_images",
    "val_split",
    "out",
}


@dataclass
class Resolved:
    recipe: object  # the TrainSettings with every default filled in
    model_cfg: object  # DPSegConfig
    dataset: object  # SegmentationDataset (train split)
    val_dataset: object | None
    keep: list[int]  # dataset class ids trained on, in prompt order
    class_names: list[str]
    bank: object | None  # bank.reader.Bank
    prototypes: object | None  # bank.reader.Prototypes
    weights: str | None  # what build_dpseg gets (None: random)
    encode_size: int | None
    micro_batch: int


def check_numbers(r) -> None:
    positive = {
        "steps": r.steps,
        "batch_size": r.batch_size,
        "grad_accum": r.grad_accum,
        "log_every": r.log_every,
        "lr": r.lr,
        "val_images": r.val_images,
    }
    for name, value in positive.items():
        if not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    non_negative = {
        "weight_decay": r.weight_decay,
        "image_lr_multiplier": r.image_lr_multiplier,
        "grad_clip": r.grad_clip,
        "checkpoint_every": r.checkpoint_every,
        "num_workers": r.num_workers,
        "val_every": r.val_every,
    }
    for name, value in non_negative.items():
        if not value >= 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise UserError(f"--{name.replace('_', '-')} must be zero or positive, got {value}")
    if not 0.0 <= r.crop_prompts <= 1.0:
        raise UserError(f"--crop-prompts is a share of the M prompt slots, in [0, 1]; got {r.crop_prompts}")
    if r.crop_negatives < 0:
        raise UserError(f"--crop-negatives counts absent classes per image, zero or more; got {r.crop_negatives}")
    if not 0.0 < r.crop_prompt_images <= 1.0:
        raise UserError(f"--crop-prompt-images is a share of the images, in (0, 1]; got {r.crop_prompt_images}")
    if not 0.0 < r.crop_present_share <= 1.0:
        raise UserError(
            f"--crop-present-share is a share of the present classes, in (0, 1]; got {r.crop_present_share}"
        )
    if r.crop_present_share < 1.0 and not r.crop_prompts:
        raise UserError("--crop-present-share thins --crop-prompts' crops: set --crop-prompts too")
    if not 0.0 <= r.crop_prompts_from < 1.0:
        raise UserError(
            "--crop-prompts-from is the share of the steps before crop prompts begin, in [0, 1); "
            f"got {r.crop_prompts_from}"
        )
    if r.crop_prompts_from and not r.crop_prompts:
        raise UserError("--crop-prompts-from says when --crop-prompts begin: set --crop-prompts too")
    if r.crop_source not in CROP_SOURCES:
        raise UserError(f"--crop-source {r.crop_source!r} is not one of {', '.join(CROP_SOURCES)}")
    if r.crop_source != "truth" and not r.crop_prompts:
        raise UserError("--crop-source says where --crop-prompts' crops are cut from: set --crop-prompts too")
    if r.crop_negative_classes not in CROP_NEGATIVE_CLASSES:
        raise UserError(
            f"--crop-negative-classes {r.crop_negative_classes!r} is not one of {', '.join(CROP_NEGATIVE_CLASSES)}"
        )
    if r.crop_negative_classes != "random" and not r.crop_negatives:
        raise UserError("--crop-negative-classes picks --crop-negatives' absent classes: set --crop-negatives too")
    if r.crop_negatives and not r.crop_prompts:
        raise UserError("--crop-negatives fills --crop-prompts' slots of absent classes: set --crop-prompts too")
    if r.crop_size < 32 or r.crop_size % 32:
        raise UserError(f"--crop-size must be a multiple of 32 (the encoder's stride), got {r.crop_size}")
    if r.mixed_precision not in MIXED_PRECISION:
        raise UserError(f"--mixed-precision {r.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
    if r.resume not in RESUME:
        raise UserError(f"--resume {r.resume!r} is not one of {', '.join(RESUME)}")


def resolve(recipe, world_size: int) -> Resolved:
    from dpseg.clip.encoders import ENCODERS
    from dpseg.data.readers import SegmentationDataset
    from dpseg.data.subsets import resolve_subset
    from dpseg.model.config import DPSegConfig

    r = dataclasses.replace(recipe)
    # 1a. numbers and switches
    check_numbers(r)
    per_step = world_size * r.grad_accum
    if r.batch_size % per_step:
        raise UserError(
            f"--batch-size {r.batch_size} (the global batch) must be a multiple of ranks x --grad-accum "
            f"= {world_size} x {r.grad_accum}"
        )
    out = Path(r.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the run")
    # 1b. the dataset and the classes trained on
    if not r.dataset:
        raise UserError(
            "--dataset is required: a prepared dataset folder (e.g. from `dpseg data synth --out data/shapes`)"
        )
    dataset = SegmentationDataset(r.dataset, "train")
    keep = resolve_subset(dataset.info, r.classes)
    names = [dataset.class_names[i] for i in keep]
    val = SegmentationDataset(r.dataset, r.val_split) if r.val_every else None
    # 1c. the model configuration (validates prompt mode, fusion, guidance)
    bank = None
    uses_bank = r.prompt_mode in ("visual", "dual") or r.visual_guidance == "prompt"
    if r.bank:
        from bank.reader import Bank

        bank = Bank(r.bank)
    elif uses_bank:
        raise UserError(
            f"--prompt-mode {r.prompt_mode} with --visual-guidance {r.visual_guidance} reads visual "
            "prompts: pass --bank DIR (or train text-only: --prompt-mode text "
            "--visual-guidance upsampled-cost)"
        )
    # 1d. encoder, weights, templates, encode size: the bank's unless given
    if r.encoder is None:
        have = bank.encoders() if bank is not None else []
        if len(have) != 1:
            raise UserError(
                f"pass --encoder (the bank holds {', '.join(have) or 'no'} encoders)"
                if bank is not None
                else "pass --encoder (e.g. tiny, convnext-b)"
            )
        r.encoder = have[0]
    ENCODERS.get(r.encoder)
    info = {}
    if bank is not None:
        if r.encoder not in bank.encoders():
            raise UserError(
                f"bank {bank.root} has no features for encoder {r.encoder!r} (it has: "
                f"{', '.join(bank.encoders()) or 'none'}); add them with: dpseg bank encode {quote(str(bank.root))} "
                f"--encoder {r.encoder}"
            )
        info = bank.config.get("encoders", {}).get(r.encoder, {})
    bank_weights = info.get("weights")
    if r.encoder_weights is None:
        r.encoder_weights = bank_weights or "default"
    elif bank_weights is not None and not names_recorded_weights(
        r.encoder, r.encoder_weights, bank_weights, info.get("weights_sha256")
    ):
        raise UserError(
            f"--encoder-weights {r.encoder_weights} differ from the weights bank {bank.root} was "
            f"encoded with ({bank_weights}): the visual prompts would not match the image features; pass "
            f"--encoder-weights {quote(str(bank_weights))} or re-encode the bank"
        )
    # the bank's size unless asked (its only one, or the encoder's input size): a mismatch is the reader's one line
    encode_size = r.encode_size if bank is None or r.encode_size is not None else bank.encode_size(r.encoder)
    if r.templates is None:
        r.templates = int(bank.config["templates"]) if bank is not None else 80
    fields = {
        "encoder": r.encoder,
        "templates": r.templates,
        "prompt_mode": r.prompt_mode,
        "fusion": r.fusion,
        "visual_guidance": r.visual_guidance,
        "image_lr_multiplier": r.image_lr_multiplier,
        "deep_supervision": r.deep_supervision,
    }
    known = DPSegConfig.__dataclass_fields__
    bad = sorted(set(r.model_overrides) - set(known))
    if bad:
        raise UserError(f"--model-overrides: unknown model config keys {bad}; known: {', '.join(sorted(known))}")
    model_cfg = DPSegConfig(**{k: v for k, v in {**fields, **r.model_overrides}.items() if k in known})
    # 1e. the bank holds every class at that encoder, template count and size (read now: I/O, not compute)
    prototypes = None
    if bank is not None and model_cfg.uses_visual:
        prototypes = read_prototypes(bank, names, r.encoder, r.templates, encode_size)
    weights = None if str(r.encoder_weights).lower() in ("none", "random") else r.encoder_weights
    return Resolved(
        recipe=r,
        model_cfg=model_cfg,
        dataset=dataset,
        val_dataset=val,
        keep=keep,
        class_names=names,
        bank=bank,
        prototypes=prototypes,
        weights=weights,
        encode_size=encode_size,
        micro_batch=r.batch_size // per_step,
    )


def read_prototypes(bank, names, encoder, templates, encode_size):
    return bank.prototypes(names, encoder, templates, encode_size=encode_size)


def names_recorded_weights(encoder: str, given: str, recorded: str, recorded_sha256: str | None = None) -> bool:
    """Whether `given` (as a user passes it) names the weights recorded in a bank (path, digest)."""
    from dpseg.clip.encoders import ENCODERS, matches_recorded, resolve_weights

    return matches_recorded(resolve_weights(ENCODERS.get(encoder), given) or "random", recorded, recorded_sha256)


def check_resumable(saved: dict, recipe: dict, where: Path) -> None:
    """A resumed run must continue the same recipe: only bookkeeping keys may change."""
    changed = sorted(k for k in recipe if k not in RESUMABLE_CHANGES and saved.get(k) != recipe[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {recipe[k]!r}" for k in changed[:4])
        raise UserError(
            f"{where} holds a run with another recipe ({diffs}); resume it unchanged, pass another --out, "
            "or --resume no to start over"
        )
