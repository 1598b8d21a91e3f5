"""`dpseg bench model`: forward latency and peak memory of the whole network and of the image
tower alone, measured in the same run so the decoder's share is a ratio.

Random init at the real architecture's shapes gives real timings (weights do not change
the arithmetic)."""

from __future__ import annotations

import platform
import resource
import statistics
import time

import torch
from tqdm import tqdm

from dpseg.model import DPSegConfig, build_dpseg
from pipeline.model_summary import random_prompts

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SED_REFERENCE = {"sed_ms_per_image": 82, "sed_device": "A6000", "sed_note": "SED paper, whole model, ConvNeXt-B, 768"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median milliseconds of `fn` and peak memory (MiB) while it ran."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # process high-water mark: monotonic, so read it as an upper bound
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return statistics.median(times), peak


def bench_model(encoder: str = "tiny", size: int | None = None, classes: list[int] = (150,),
                batches: list[int] = (1,), dtype: str = "fp32", device: str = "cpu",
                warmup: int = 2, repeats: int = 5, class_chunk: int | None = None) -> dict:
    dev = torch.device(device)
    if dtype == "fp16" and dev.type == "cpu":
        raise ValueError("fp16 on the CPU is not supported here; use fp32 or bf16")
    cfg = DPSegConfig(encoder=encoder, class_chunk=class_chunk)
    model = build_dpseg(cfg, weights=None, device=dev).to(DTYPES[dtype]).eval()
    size = size or model.encoder_spec.image_size
    results = []
    grid = [(b, n) for b in batches for n in classes]
    for batch, num_classes in tqdm(grid, desc="bench model", unit="case"):
        images = torch.randn(batch, 3, size, size, device=dev, dtype=DTYPES[dtype])
        text, visual = random_prompts(model, num_classes, device=dev, dtype=DTYPES[dtype])
        with torch.inference_mode():
            trunk_ms, trunk_peak = _time(lambda: model.encode_image(images), dev, warmup, repeats)
            model_ms, model_peak = _time(lambda: model(images, text=text, visual=visual), dev, warmup, repeats)
        results.append({
            "batch": batch, "classes": num_classes,
            "model_ms": round(model_ms, 3), "model_ms_per_image": round(model_ms / batch, 3),
            "trunk_ms": round(trunk_ms, 3), "trunk_ms_per_image": round(trunk_ms / batch, 3),
            "decoder_share": round(1 - trunk_ms / model_ms, 4),
            "peak_mem_mib_model": round(model_peak, 1), "peak_mem_mib_trunk": round(trunk_peak, 1),
        })
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "bench": "model",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "encoder": encoder, "size": size, "dtype": dtype, "class_chunk": class_chunk,
        "warmup": warmup, "repeats": repeats,
        "memory_note": "CUDA: max allocated; CPU: process peak RSS (upper bound)",
        "results": results,
        "reference": SED_REFERENCE,
        "config": cfg.to_dict(),
    }
