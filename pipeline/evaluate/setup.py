"""What an evaluation (or `dpseg segment`) needs before its loop: the checkpoint and what it
records, the bank it must agree with, the dataset and its class subset, and the prompts.

Every mismatch is refused here, in one line, before any slow work."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bank.runtime import resolve_device
from dpseg.errors import UserError
from dpseg.model.prompts import VisualPrompts
from dpseg.refine import PAPER_MERGE


def checkpoint_facts(config: dict) -> dict[str, Any]:
    """What evaluation needs from a checkpoint's config.json: the facts training records in
    `extra` (pipeline/train/loop.py run_record); a checkpoint saved without them (save_dpseg by
    hand) has only its model config, and evaluation then asks for --bank and --size."""
    extra = config.get("extra") or {}
    return {
        "bank": (extra.get("bank") or {}).get("path"),
        "encoder": extra.get("encoder") or config["encoder"]["name"],
        "encoder_weights": _weights_id(config["encoder_weights"]),
        "encode_size": extra.get("encode_size"),
        "size": (extra.get("recipe") or {}).get("crop_size"),
        "step": extra.get("step"),
        "crop_prompts": float((extra.get("recipe") or {}).get("crop_prompts") or 0.0),
    }


def pass2_merge(facts: dict) -> tuple[str, float]:
    """How pass II merges crop prompts unless told: as the checkpoint met them in training. A
    decoder trained with `crop_prompts s` saw crops in a share s of the slots (mix, s); one trained
    on bank prompts alone gets the paper's replace-all."""
    share = facts.get("crop_prompts") or 0.0
    return ("mix", share) if share > 0 else PAPER_MERGE


def _weights_id(weights) -> str:
    # the bank records random towers as "random"; recipes may say none/None
    return "random" if weights is None or str(weights).lower() in ("none", "random") else str(weights)


def bank_encoder_info(bank, encoder: str, weights: str) -> dict:
    """The bank's record of `encoder`, refused when absent or computed with other weights."""
    info = bank.encoder_info(encoder)
    from dpseg.clip.encoders import matches_recorded

    if not matches_recorded(weights, info.get("weights"), info.get("weights_sha256")) and not stands_in(
        info.get("weights"), weights
    ):
        raise UserError(
            f"checkpoint encoder {encoder!r} has weights {weights!r} but bank {bank.root} was encoded with "
            f"{info.get('weights')!r}; pass the bank the checkpoint was trained with (--bank) or the weights it was "
            f"trained with (--encoder-weights)"
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
    """Bank prototypes at `encode_size` (the reader refuses a group encoded at another size)."""
    protos = bank.prototypes(names, encoder, templates=templates, device=device, encode_size=encode_size)
    return VisualPrompts(protos.embedding, dict(protos.pooled))


def text_prompts(model, names: list[str], cache_dir: str | None) -> tuple[torch.Tensor, str]:
    from pipeline.text_cache import cached_text_embeddings

    return cached_text_embeddings(model, names, cache_dir=cache_dir), "cached"


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
    pass2_merge: tuple[str, float] = PAPER_MERGE

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
    """The checkpoint's config and facts, with its recorded paths made usable from anywhere: the
    carried weights file as its path inside the checkpoint, the bank relative to the run folder."""
    from dpseg.model.checkpoint import read_checkpoint_config, recorded_weights

    config = read_checkpoint_config(path)
    facts = checkpoint_facts(config)
    if config.get("encoder_weights") is not None:
        facts["encoder_weights"] = _weights_id(recorded_weights(path, config))
    facts["bank"] = run_path(path, facts["bank"])
    return config, facts


def run_path(checkpoint: str | Path, recorded: str | None) -> str | None:
    """A path a run recorded relative to its run folder (the checkpoint folder's parent), as a path
    from here. Checkpoints written before runs recorded relative paths hold paths relative to the
    directory they were made in: such a path is used as it is when only it exists."""
    if not recorded or Path(recorded).is_absolute():
        return recorded
    from_run = Path(checkpoint).parent / recorded
    return str(from_run) if from_run.exists() or not Path(recorded).exists() else recorded


def open_bank(given: str | None, facts: dict, checkpoint: str):
    """The bank to read prompts from: `--bank`, else the one the checkpoint was trained with."""
    from bank.reader import Bank

    bank_dir = given or facts["bank"]
    if not bank_dir:
        raise UserError(f"checkpoint {checkpoint} records no bank; pass --bank DIR")
    if not given and not Path(bank_dir).exists():
        raise UserError(
            f"the bank checkpoint {checkpoint} was trained with ({bank_dir}) does not exist here; pass --bank DIR "
            f"(that bank, moved or copied)"
        )
    if given and not Path(bank_dir).exists():
        raise UserError(f"--bank {bank_dir} does not exist; pass the folder of the bank the checkpoint used")
    return Bank(bank_dir)


def tower_weights(given: str | None, facts: dict, bank_info: dict | None) -> tuple[str, str | None]:
    """(the weights the checkpoint's towers are identified by, what load_dpseg rebuilds them from:
    None for the recorded ones). `given` (--encoder-weights) wins; a recorded local file that is
    gone is stood in for by the bank's file (load_dpseg checks the towers' digest either way)."""
    if given is not None:
        from dpseg.clip.encoders import ENCODERS, resolve_weights

        resolved = _weights_id(resolve_weights(ENCODERS.get(facts["encoder"]), given))
        return resolved, resolved
    recorded = facts["encoder_weights"]
    bank_weights = (bank_info or {}).get("weights")
    if bank_info is not None and stands_in(bank_weights, recorded):
        return recorded, bank_weights
    return recorded, None


def weights_label(weights: str) -> str:
    """How an evaluation records the towers' weights: a tag or "random" as it is, a local file by
    its digest (the file's path changes when a run folder moves; its bytes do not)."""
    from dpseg.clip.encoders import weights_digest

    digest = weights_digest(weights)
    return f"sha256:{digest}" if digest else weights


def prepare_context(settings) -> EvalContext:
    from dpseg.data.readers import SegmentationDataset
    from dpseg.data.subsets import remap_labels, resolve_subset
    from dpseg.data.transforms import EvalTransform

    device = torch.device(resolve_device(settings.device))
    # 1. the facts the checkpoint records (the model loads once they are checked)
    _, facts = read_facts(settings.checkpoint)
    weights = getattr(settings, "encoder_weights", None)
    if weights is not None:
        facts["encoder_weights"] = tower_weights(weights, facts, None)[0]
    bank_dir = settings.bank or facts["bank"]
    # 2. bank: same encoder and weights as the checkpoint's towers
    bank = open_bank(settings.bank, facts, settings.checkpoint)
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

    _, source = tower_weights(weights, facts, info)
    model = load_dpseg(settings.checkpoint, device, encoder_weights=source).eval()

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
        encoder_weights=weights_label(facts["encoder_weights"]),
        bank_dir=Path(bank_dir),
        bank_generator=bank.generator,
        text_source=source,
        checkpoint_step=facts["step"],
        pass2_merge=pass2_merge(facts),
    )
