"""`dpseg bench eval`: what pass II costs, and how evaluation scales with the vocabulary.

1. ratio: two-pass / one-pass latency per batch at equal input (`ratio_classes` classes), for
   each pass-II mode in one run: `exact` (a second decoder run over all classes), `topk<k>`
   for each k of `topk` (pass II decodes each image's k best pass-I classes, the rest keep pass
   I's logits and pass I's upsampled scores) and `topk<k>+fit` (also each crop encoded at the
   smallest multiple of 32 holding it). One pass =
   image tower + decoder + SED post-processing; two passes add detection, the crops through the
   prompt tower and the second decoder run on pass I's features.
2. scaling: latency and peak memory of one two-pass evaluation step at each class count, plain
   and with `class_chunk` (bounded memory). On the CPU every case runs in a fresh process and
   its peak resident memory is read from that process alone (ru_maxrss is monotonic per
   process); on CUDA, torch's peak-allocated counter is reset per case.

Random weights at the real shapes: timings do not depend on the values. A random network
detects classes at random; `detect_classes` fixes how many classes each image refines (the
pass-I map is replaced by one with that many equal blocks), so the cost is the same from run
to run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from collections.abc import Sequence

import torch

from pipeline.bench.common import SED_REFERENCE, sync

_MODELS: dict = {}


def _detect_map(batch: int, size: int, classes: int, device) -> torch.Tensor:
    """A pass-I argmax map of `classes` blocks per image on a g x g grid (g = ceil(sqrt(classes)),
    the last class taking the spare cells): fixed refinement work, objects smaller than the image
    as real detections are (what `fit` encodes smaller)."""
    g = max(1, int(-(-(classes**0.5) // 1)))
    cell = torch.arange(size, device=device) * g // size
    grid = (cell.view(size, 1) * g + cell.view(1, size)).clamp(max=classes - 1)
    return grid.expand(batch, size, size).contiguous()


def _case(
    encoder: str,
    size: int | None,
    num_classes: int,
    class_chunk: int | None,
    batch: int,
    repeats: int,
    device: str,
    detect_classes: int,
    templates: int,
    topk: int = 0,
    fit: bool = False,
    crop_channels: bool = False,
) -> dict:
    from dpseg.metrics import predict_labels, predict_labels_pair
    from dpseg.model import DPSegConfig, PassContext, build_dpseg
    from dpseg.model.summary import random_prompts
    from dpseg.refine import RefineSettings, refine_batch, replace_prompts, top_classes
    from pipeline.evaluate.loop import fast_pass2

    torch.manual_seed(0)
    dev = torch.device(device)
    key = (encoder, templates, device, crop_channels)
    if key not in _MODELS:  # in-process runs build the network once
        _MODELS.clear()
        cfg = DPSegConfig(encoder=encoder, templates=templates, crop_channels=crop_channels)
        _MODELS[key] = build_dpseg(cfg, weights=None, device=dev).eval()
    model = _MODELS[key]
    size = size or model.encoder_spec.image_size
    images01 = torch.rand(batch, 3, size, size, device=dev)
    text, visual = random_prompts(model, num_classes, device=dev)
    settings = RefineSettings(encode_size=size, min_area=1, fit=fit)
    detect = _detect_map(batch, size, min(detect_classes, num_classes), dev)

    def one_pass():
        features = model.encode_image(model.image_encoder.normalize(images01))
        logits = model(text=text, visual=visual, features=features, class_chunk=class_chunk)
        return features, predict_labels(logits, (size, size), class_chunk)

    def two_pass():
        fast = bool(topk) and topk < num_classes
        context = PassContext() if fast else None  # as `dpseg eval --topk`: what pass I leaves pass II
        features = model.encode_image(model.image_encoder.normalize(images01))
        logits1 = model(text=text, visual=visual, features=features, class_chunk=class_chunk, context_out=context)
        refs = refine_batch(model, images01, detect, settings)  # (the map stands in for pass I's argmax)
        if fast:  # the top classes in pass I's context; pass I's scores serve both passes' labels
            index = top_classes(logits1, topk)
            part = fast_pass2(model, text, visual, features, refs, settings, index, class_chunk, context)
            return predict_labels_pair(logits1, index, part, (size, size), class_chunk)
        predict_labels(logits1, (size, size), class_chunk)  # pass I's answer (and the detection map)
        logits = model(text=text, visual=replace_prompts(visual, refs), features=features, class_chunk=class_chunk)
        return predict_labels(logits, (size, size), class_chunk)

    def timed_pair(first, second) -> tuple[float, float]:
        # interleaved, so a load change on a shared machine hits both sides of the ratio alike
        times: tuple[list[float], list[float]] = ([], [])
        with torch.inference_mode():
            first(), second()  # warm-up
            sync(dev)
            for _ in range(repeats):
                for fn, out in ((first, times[0]), (second, times[1])):
                    start = time.perf_counter()
                    fn()
                    sync(dev)
                    out.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times[0]), statistics.median(times[1])

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev) / 2**20
    one_ms, two_ms = timed_pair(one_pass, two_pass)
    result = {
        "classes": num_classes,
        "class_chunk": class_chunk,
        "batch": batch,
        "size": size,
        "one_pass_ms": round(one_ms, 2),
        "two_pass_ms": round(two_ms, 2),
        "two_pass_ms_per_image": round(two_ms / batch, 2),
        "two_over_one": round(two_ms / one_ms, 3),
        "timing": "medians of interleaved one-pass / two-pass runs",
        "refined_classes_per_image": min(detect_classes, num_classes),
        "topk": topk,
        "fit": fit,
    }
    if dev.type == "cuda":
        result["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        result["working_mem_mib"] = round(result["peak_mem_mib"] - base_cuda, 1)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["peak_rss_mib"] = round(peak, 1)
        result["working_mem_mib"] = round(peak - base_rss, 1)
    return result


def _worker(queue, kwargs) -> None:
    torch.set_num_threads(kwargs.pop("threads"))
    try:
        queue.put(_case(**kwargs))
    except BaseException as err:  # noqa: BLE001 - reported to the parent as data
        queue.put({"error": repr(err)})


def _run_isolated(kwargs: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(queue, {**kwargs, "threads": torch.get_num_threads()}))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"bench case {kwargs} failed: {result['error']}")
    return result


def bench_eval(
    encoder: str = "tiny",
    size: int | None = None,
    classes: list[int] = (150, 459, 847),
    class_chunk: int = 64,
    ratio_classes: int = 150,
    batch: int = 2,
    device: str = "cpu",
    repeats: int = 3,
    detect_classes: int = 8,
    templates: int = 80,
    isolate: bool = True,
    topk: Sequence[int] = (16, 8),
    crop_channels: bool = False,
) -> dict:
    from tqdm.auto import tqdm

    run = _run_isolated if isolate and device == "cpu" else (lambda kw: _case(**kw))
    common = {
        "encoder": encoder,
        "size": size,
        "batch": batch,
        "repeats": repeats,
        "device": device,
        "detect_classes": detect_classes,
        "templates": templates,
        "crop_channels": crop_channels,
    }
    modes = {"exact": (0, False)}
    for k in topk:
        modes |= {f"topk{k}": (k, False), f"topk{k}+fit": (k, True)}
    cases = [(ratio_classes, None, m) for m in modes] + [
        (n, chunk, "exact") for n in classes for chunk in (None, class_chunk)
    ]
    results = [
        run({**common, "num_classes": n, "class_chunk": c, "topk": modes[m][0], "fit": modes[m][1]})
        for n, c, m in tqdm(cases, desc="bench eval", unit="case")
    ]
    ratio = results[0]
    by_mode = dict(zip(modes, results[: len(modes)], strict=True))
    scaling = results[len(modes) :]
    chunked = [r for r in scaling if r["class_chunk"]]
    per_class = [r["working_mem_mib"] / r["classes"] for r in chunked]
    return {
        "bench": "eval",
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "encoder": encoder,
        "weights": "random",
        "size": ratio["size"],
        "batch": batch,
        "repeats": repeats,
        "templates": templates,
        "crop_channels": crop_channels,
        "class_chunk": class_chunk,
        "two_pass_over_one_pass": ratio["two_over_one"],
        "two_pass_over_one_pass_by_mode": {m: r["two_over_one"] for m, r in by_mode.items()},
        "goal_two_pass_over_one_pass": 1.35,
        "topk": list(topk),
        "ratio_case": ratio,
        "ratio_cases": by_mode,
        "scaling": scaling,
        "chunked_working_mem_mib_per_class": [round(v, 3) for v in per_class],
        "memory_note": (
            "CPU: peak resident memory of a fresh process per case (includes the model); "
            "working_mem = peak minus the resident memory before the first forward"
        ),
        **SED_REFERENCE,
    }
