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
from dpseg.model.summary import random_prompts
from pipeline.bench.common import SED_REFERENCE, sync

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _time(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median milliseconds of `fn` and peak memory (MiB) while it ran."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # process high-water mark: monotonic, so read it as an upper bound
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return statistics.median(times), peak


def bench_model(
    encoder: str = "tiny",
    size: int | None = None,
    classes: list[int] = (150,),
    batches: list[int] = (1,),
    dtype: str = "fp32",
    device: str = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    class_chunk: int | None = None,
    reject_topk: int | None = None,
    threads: int | None = None,
    compile_decoder: bool = False,
) -> dict:
    """Per (batch, classes): the whole forward, the image tower alone, and the decoder alone on
    precomputed features; with `class_chunk`, the chunked decoder too (same run, so the ratio
    is fair); with `reject_topk`, the decoder with SED's early rejection."""
    dev = torch.device(device)
    if threads:  # on a shared CPU, OpenMP threads that outnumber free cores spin and wait 10-40x longer
        torch.set_num_threads(threads)
    if dtype == "fp16" and dev.type == "cpu":
        raise ValueError("fp16 on the CPU is not supported here; use fp32 or bf16")
    cfg = DPSegConfig(encoder=encoder)
    model = build_dpseg(cfg, weights=None, device=dev).to(DTYPES[dtype]).eval()
    compiled = torch.compile(model.decoder.forward) if compile_decoder else None
    size = size or model.encoder_spec.image_size
    results = []
    grid = [(b, n) for b in batches for n in classes]
    for batch, num_classes in tqdm(grid, desc="bench model", unit="case"):
        images = torch.randn(batch, 3, size, size, device=dev, dtype=DTYPES[dtype])
        text, visual = random_prompts(model, num_classes, device=dev, dtype=DTYPES[dtype])
        row = {"batch": batch, "classes": num_classes}
        with torch.inference_mode():
            features = model.encode_image(images)
            cases = {
                "trunk": lambda im=images: model.encode_image(im),
                "model": lambda im=images, t=text, v=visual: model(im, text=t, visual=v),
                "decoder": lambda f=features, t=text, v=visual: model(text=t, visual=v, features=f),
            }
            if class_chunk:
                cases["decoder_chunked"] = lambda f=features, t=text, v=visual: model(
                    text=t, visual=v, features=f, class_chunk=class_chunk
                )
            for name, fn in cases.items():
                ms, peak = _time(fn, dev, warmup, repeats)
                row[f"{name}_ms"] = round(ms, 3)
                row[f"{name}_ms_per_image"] = round(ms / batch, 3)
                row[f"peak_mem_mib_{name}"] = round(peak, 1)
            if reject_topk:
                model.cfg.class_reject_topk = reject_topk
                try:
                    ms, peak = _time(
                        lambda f=features, t=text, v=visual: model(text=t, visual=v, features=f), dev, warmup, repeats
                    )
                finally:
                    model.cfg.class_reject_topk = None
                row["decoder_reject_ms"] = round(ms, 3)
                row["reject_speedup"] = round(row["decoder_ms"] / ms, 3)
                row["peak_mem_mib_decoder_reject"] = round(peak, 1)
            if compiled is not None:
                # the first call compiles (this shape): reported apart from the steady state
                eager = model(text=text, visual=visual, features=features)
                model.compiled_decoder = compiled
                try:
                    start = time.perf_counter()
                    fast = model(text=text, visual=visual, features=features)
                    sync(dev)
                    row["decoder_compiled_warmup_s"] = round(time.perf_counter() - start, 2)
                    ms, peak = _time(
                        lambda f=features, t=text, v=visual: model(text=t, visual=v, features=f), dev, warmup, repeats
                    )
                finally:
                    model.compiled_decoder = None
                row["decoder_compiled_ms"] = round(ms, 3)
                row["decoder_compiled_ms_per_image"] = round(ms / batch, 3)
                row["compiled_speedup"] = round(row["decoder_ms"] / ms, 3)
                row["compiled_max_abs_diff"] = float((fast.float() - eager.float()).abs().max())
                row["peak_mem_mib_decoder_compiled"] = round(peak, 1)
        row["decoder_share"] = round(1 - row["trunk_ms"] / row["model_ms"], 4)
        if class_chunk:
            row["chunked_over_unchunked"] = round(row["decoder_chunked_ms"] / row["decoder_ms"], 3)
        results.append(row)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "bench": "model",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "encoder": encoder,
        "size": size,
        "dtype": dtype,
        "class_chunk": class_chunk,
        "reject_topk": reject_topk,
        "warmup": warmup,
        "repeats": repeats,
        "memory_note": "CUDA: max allocated; CPU: process peak RSS (upper bound, monotonic)",
        "results": results,
        "scaling": class_scaling(results),
        "reference": SED_REFERENCE,
        "config": cfg.to_dict(),
    }


def class_scaling(results: list[dict]) -> list[dict]:
    """Per batch size: decoder time ratio between the largest and smallest class counts, over the
    class ratio (<= 1: at most linear in the number of classes)."""
    out = []
    for batch in sorted({r["batch"] for r in results}):
        rows = sorted((r for r in results if r["batch"] == batch), key=lambda r: r["classes"])
        if len(rows) < 2:
            continue
        lo, hi = rows[0], rows[-1]
        time_ratio = hi["decoder_ms"] / lo["decoder_ms"]
        class_ratio = hi["classes"] / lo["classes"]
        out.append(
            {
                "batch": batch,
                "classes": [lo["classes"], hi["classes"]],
                "decoder_time_ratio": round(time_ratio, 3),
                "class_ratio": round(class_ratio, 3),
                "time_over_linear": round(time_ratio / class_ratio, 3),
            }
        )
    return out
