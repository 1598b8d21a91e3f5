"""`dpseg segment`: any photo, any class names, one or two passes, an overlay PNG with a legend.

Classes the bank holds use their bank prompts. Classes it lacks get text-only prompts: their
visual embedding slot takes the text embedding (so the fused prompt is the text prompt) and their
pooled visual-guidance features are zero (no visual cost). With `generate`, the bank's own
generator makes their prompt images first and adds them to the bank (the bank's only writer is
`bank.build`, as for any other build). Pass II then refines every detected class alike.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bank.runtime import resolve_device
from dpseg.clip.templates import primary_name
from dpseg.data.vocab import parse_classes
from dpseg.errors import UserError
from dpseg.io import atomic_write_json
from dpseg.metrics import predict_labels
from dpseg.model.prompts import VisualPrompts
from dpseg.refine import DEFAULT_MIN_AREA, RefineSettings, refine_batch, replace_prompts
from pipeline.evaluate.panels import blend, legend_for, palette, save_panels
from pipeline.evaluate.setup import (
    bank_encoder_info,
    load_prototypes,
    open_bank,
    read_facts,
    text_prompts,
    tower_weights,
)


@dataclass
class SegmentSettings:
    images: list[str]
    classes: str  # "cat, dog, sofa", a vocabulary name, or a .txt/.json file
    checkpoint: str
    out: str = "out/segment"
    bank: str | None = None
    passes: int = 2
    size: int | None = None
    min_area: int = DEFAULT_MIN_AREA
    crop: str = "masked"
    instances: int = 0
    generate: bool = False
    class_chunk: int | None = None
    device: str = "auto"
    encoder_weights: str | None = None  # default: the checkpoint's (carried or recorded)


def read_image(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"image {path} is unreadable ({err}); pass a JPEG or PNG file") from None


def bank_has(bank, encoder: str, names: list[str]) -> list[bool]:
    cats = set(bank.config.get("categories") or [])
    return [primary_name(n) in cats for n in names]


def generate_missing(bank, missing: list[str], encoder: str, weights: str, encode_size: int) -> None:
    """The bank's generator, with the bank's own settings, makes the missing classes' prompt
    images; `bank.build` stores and encodes them (a bank holds one generator setting)."""
    from dataclasses import fields

    from bank.build import BuildOptions, build_bank
    from bank.generators.base import GeneratorOptions

    recorded = bank.config["generator"].get("settings") or {}
    known = {f.name for f in fields(GeneratorOptions)} - {"device", "dtype", "compile", "extra"}
    options = GeneratorOptions(**{k: v for k, v in recorded.items() if k in known})
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "missing.txt"
        vocab.write_text("".join(f"{n}\n" for n in missing))
        opts = BuildOptions(
            out=bank.root,
            generator=bank.generator,
            vocab=[str(vocab)],
            encoder=encoder,
            encoder_weights=None if weights == "random" else weights,
            encode_size=encode_size,
            templates=int(bank.config["templates"]),
            seed=int(bank.config["seed"]),
            generator_options=options,
            progress=False,
        )
        build_bank(opts)


def segment(settings: SegmentSettings, progress: bool = True) -> dict:
    from bank.reader import Bank

    # 1. inputs first: bad images and classes fail before the model loads
    names = parse_classes(settings.classes)
    images = [read_image(p) for p in settings.images]
    if settings.passes not in (1, 2):
        raise UserError(f"--passes must be 1 or 2, got {settings.passes}")
    device = torch.device(resolve_device(settings.device))
    from dpseg.model.checkpoint import load_dpseg
    from dpseg.model.config import DPSegConfig

    config, facts = read_facts(settings.checkpoint)
    if settings.encoder_weights is not None:
        facts["encoder_weights"] = tower_weights(settings.encoder_weights, facts, None)[0]
    bank = info = None
    if DPSegConfig.from_dict(config["model"]).uses_visual:
        bank = open_bank(settings.bank, facts, settings.checkpoint)
        info = bank_encoder_info(bank, facts["encoder"], facts["encoder_weights"])
    model = load_dpseg(settings.checkpoint, device, tower_weights(settings.encoder_weights, facts, info)[1]).eval()
    cfg = model.cfg
    size = int(settings.size or facts["size"] or model.encoder_spec.image_size)
    # 2. prompts: bank prototypes where the bank has the class, text-only otherwise
    bank_dir = settings.bank or facts["bank"]
    text = text_prompts(model, names, None)[0] if cfg.uses_text else None
    text_only: list[str] = []
    visual = None
    encode_size = facts["encode_size"] or model.prompt_encoder.image_size
    if cfg.uses_visual:
        encode_size = int(facts["encode_size"] or info.get("encode_size") or info["prompt_size"])
        have = bank_has(bank, facts["encoder"], names)
        if settings.generate and not all(have):
            generate_missing(
                bank,
                [n for n, h in zip(names, have, strict=True) if not h],
                facts["encoder"],
                facts["encoder_weights"],
                encode_size,
            )
            bank = Bank(bank_dir)
            have = bank_has(bank, facts["encoder"], names)
        text_only = [n for n, h in zip(names, have, strict=True) if not h]
        visual = _prompts(model, bank, names, have, text, facts["encoder"], device, encode_size)
    refine = RefineSettings(encode_size, settings.min_area, settings.crop, settings.instances)
    # 3. each image: pass I, pass II, predictions at the photo's own size, the overlay PNG
    colours = palette(len(names))
    out = Path(settings.out)
    results = []
    for path, image in zip(settings.images, images, strict=True):
        x = torch.from_numpy(np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)).copy())
        images01 = x.permute(2, 0, 1)[None].float().div(255).to(device)
        with torch.inference_mode():
            features = model.encode_image(model.image_encoder.normalize(images01))
            logits = model(text=text, visual=visual, features=features, class_chunk=settings.class_chunk)
            preds = {1: predict_labels(logits, image.shape[:2], settings.class_chunk)[0].cpu().numpy()}
            if settings.passes == 2:
                detect_map = predict_labels(logits, (size, size), settings.class_chunk)
                refs = refine_batch(model, images01, detect_map, refine)
                logits2 = model(
                    text=text, visual=replace_prompts(visual, refs), features=features, class_chunk=settings.class_chunk
                )
                preds[2] = predict_labels(logits2, image.shape[:2], settings.class_chunk)[0].cpu().numpy()
        final = preds[settings.passes]
        areas = np.bincount(final.ravel(), minlength=len(names))
        detected = [
            {"class": names[i], "id": int(i), "pixels": int(areas[i]), "share": float(areas[i] / final.size)}
            for i in np.argsort(-areas, kind="stable")
            if areas[i] > 0
        ]
        target = out / f"{Path(path).stem}.png"
        tiles = [("image", image)] + [(f"pass {'I' * p}", blend(image, preds[p], colours)) for p in sorted(preds)]
        save_panels(target, tiles, legend_for(list(preds.values()), names, colours))
        results.append({"image": str(path), "output": str(target), "detected": detected})
    report = {
        "classes": names,
        "text_only": text_only,
        "passes": settings.passes,
        "size": size,
        "checkpoint": str(settings.checkpoint),
        "bank": str(bank_dir) if bank_dir else None,
        "images": results,
    }
    atomic_write_json(out / "segment.json", report)
    return report


def _prompts(model, bank, names, have, text, encoder, device, encode_size) -> VisualPrompts:
    present = [n for n, h in zip(names, have, strict=True) if h]
    m = model.cfg.templates
    tower = model.prompt_encoder
    emb = torch.zeros(len(names), m, tower.embed_dim, device=device)
    pooled = {s: torch.zeros(len(names), m, tower.channels_at(s), device=device) for s in (4, 8, 16)}
    if present:
        protos = load_prototypes(bank, present, encoder, m, device, encode_size)
        rows = torch.tensor([i for i, h in enumerate(have) if h], device=device)
        emb[rows] = protos.embedding
        for s in pooled:
            pooled[s][rows] = protos.pooled[s]
    missing = [i for i, h in enumerate(have) if not h]
    if missing and text is not None:  # text-only: the fused embedding is the text prompt itself
        emb[missing] = text[missing].to(emb)
    return VisualPrompts(emb, pooled)
