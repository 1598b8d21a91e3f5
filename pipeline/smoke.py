"""`dpseg smoke`: a smoke check of the untrained network (the main job is `dvc repro`).

After the bank exists, the network on
the bank's encoder (tiny, random init, no download) segments a synthetic `shapes` scene with
real text prompts and the bank's visual prompts. Without a bank, random visual prompts stand in.

The network is untrained (training is a later stage), so the accuracy it prints is chance
level: the check shows every piece running end to end, not a result."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dpseg.data.shapes import SHAPES_CATEGORIES, render_scene
from dpseg.model import DPSegConfig, VisualPrompts, build_dpseg
from dpseg.model.summary import model_summary, random_prompts


def run_smoke(size: int = 128, seed: int = 0, bank_dir: str | Path | None = None) -> dict:
    # 1. prompts' source: the bank (its encoder, templates and class names) or random stand-ins
    encoder, templates, weights, names = "tiny", 80, None, list(SHAPES_CATEGORIES)
    bank = None
    if bank_dir is not None:
        from bank.reader import Bank

        bank = Bank(bank_dir)
        encoder = bank.encoders()[0]
        info = bank.config["encoders"][encoder]
        weights = None if info["weights"] == "random" else info["weights"]
        templates = int(bank.config["templates"])
        names = [n for n in bank.config["categories"] if n in set(SHAPES_CATEGORIES)] or names
    cfg = DPSegConfig(encoder=encoder, templates=templates)
    # 2. the network; random weights are seeded exactly as the bank's encoder seeds them
    torch.manual_seed(0)
    model = build_dpseg(cfg, weights=weights).eval()
    text = model.encode_text(names)  # real CLIP tokenizer on the frozen text tower
    if bank is not None:
        protos = bank.prototypes(names, encoder, templates)
        visual = VisualPrompts(protos.embedding, {s: protos.pooled[s] for s in cfg.guidance_strides})
    else:
        torch.manual_seed(seed)
        _, visual = random_prompts(model, len(names))
    # 3. a synthetic scene with its ground truth, segmented in one forward pass
    image, label = render_scene(size, seed, "demo", [SHAPES_CATEGORIES.index(n) for n in names])
    pixels = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float() / 255
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(model.image_encoder.normalize(pixels), text=text, visual=visual)
    forward_ms = (time.perf_counter() - start) * 1e3
    upsampled = torch.nn.functional.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
    ids = upsampled.argmax(1)[0].flatten()
    predicted = np.array([SHAPES_CATEGORIES.index(names[i]) for i in ids]).reshape(label.shape)
    valid = label != 255
    return {
        "summary": model_summary(cfg, num_classes=len(names), size=size),
        "prompts": f"bank {bank.root} ({bank.generator}, {encoder})" if bank is not None else "random visual prompts",
        "classes": len(names),
        "logits_shape": list(logits.shape),
        "forward_ms": round(forward_ms, 2),
        "pixel_accuracy": round(float((predicted[valid] == label[valid]).mean()), 4) if valid.any() else None,
        "chance": round(1 / len(names), 4),
    }
