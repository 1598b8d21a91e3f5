"""The embedded offline default job: build the network on the tiny encoder (random init, no
download), print its summary, and run one forward pass with real text prompts."""

from __future__ import annotations

import time

import torch

from dpseg.model import DPSegConfig, build_dpseg
from pipeline.model_summary import model_summary, random_prompts

DEMO_CLASSES = ["red striped triangle", "blue dotted circle", "green square", "building, edifice"]


def run_demo(size: int = 128, seed: int = 0) -> dict:
    cfg = DPSegConfig(encoder="tiny")
    summary = model_summary(cfg, num_classes=len(DEMO_CLASSES), size=size)
    torch.manual_seed(seed)
    model = build_dpseg(cfg, weights=None).eval()
    text = model.encode_text(DEMO_CLASSES)  # real CLIP tokenizer, tiny random text tower
    _, visual = random_prompts(model, len(DEMO_CLASSES))  # the bank stage supplies real ones
    images = torch.rand(1, 3, size, size)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(model.image_encoder.normalize(images), text=text, visual=visual)
    return {
        "summary": summary,
        "classes": DEMO_CLASSES,
        "logits_shape": list(logits.shape),
        "forward_ms": round((time.perf_counter() - start) * 1e3, 2),
        "predicted_class_histogram": torch.bincount(logits.argmax(1).flatten(), minlength=len(DEMO_CLASSES)).tolist(),
    }
