"""`dpseg bench app`: time from pressing Run to both overlays, measured on the page's own Run
function (AppRunner.run: decode the upload, prompts, pass I, pass II, overlays, legend and the
prompt/crop gallery), after start-up. The browser's share (upload, drawing) is not in it."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dpseg.errors import UserError


def bench_image(size: int, dataset: str | None) -> tuple[np.ndarray, str]:
    """A `size`-px square picture: the first val image of `dataset` resized, else drawn shapes."""
    from PIL import Image, ImageDraw

    if dataset and Path(dataset).is_dir():
        from dpseg.data.readers import SegmentationDataset

        image, _ = SegmentationDataset(dataset, "val").load(0)
        return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)), f"{dataset} val #0"
    canvas = Image.new("RGB", (size, size), (235, 230, 220))
    draw = ImageDraw.Draw(canvas)
    s = size // 8
    draw.ellipse([s, s, 4 * s, 4 * s], fill=(220, 30, 30))
    draw.rectangle([5 * s, 2 * s, 7 * s, 5 * s], fill=(30, 60, 220))
    draw.polygon([(2 * s, 7 * s), (4 * s, 5 * s), (6 * s, 7 * s)], fill=(40, 180, 60))
    return np.asarray(canvas), "drawn shapes"


def bench_app(
    checkpoint: str,
    bank: str | None = None,
    classes: str | None = None,
    size: int = 512,
    repeats: int = 5,
    device: str = "cpu",
    kind: str | None = None,
) -> dict:
    import os

    import torch
    from PIL import Image

    from pipeline.app.runner import AppRunner
    from pipeline.evaluate.session import SegmentSession

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    session = SegmentSession(checkpoint, bank, device)
    load_s = time.perf_counter() - start
    runner = AppRunner(session)
    dataset = session.extra.get("dataset")
    image, source = bench_image(size, dataset)
    if classes is None:
        vocab = (session.extra.get("vocabulary") or {}).get("name")
        classes = vocab if isinstance(vocab, str) else None
    if not classes:
        raise UserError("the checkpoint records no vocabulary; pass --classes")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.png"
        Image.fromarray(image).save(path)
        times, cpu = [], []
        for i in range(repeats + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            view = runner.run(path, classes, None, kind, refine=True)
            elapsed = time.perf_counter() - t0
            if not view.ok:
                raise UserError(view.status.removeprefix("Error: "))
            if 2 not in view.overlays:
                raise UserError("this checkpoint runs one pass only (no visual prompts); nothing to time for pass II")
            if i == 0:
                first_s = elapsed  # text prompts encoded and bank prototypes read: cached afterwards
            else:
                times.append(elapsed)
                cpu.append(time.process_time() - c0)
    return {
        "bench": "app",
        "measures": "AppRunner.run (the page's Run): upload decode, prompts, pass I, pass II, both overlays, "
        "legend, prompt/crop gallery; median of the warm runs after start-up",
        "checkpoint": str(checkpoint),
        "bank": session.bank_dir,
        "device": str(session.device),
        "threads": torch.get_num_threads(),
        "image": {"size": [size, size], "source": source},
        "model_input": session.size,
        "classes": len(view.classes),
        "prompts": view.state.prompts.kind,
        "refined_classes": int(view.state.refinement.classes.numel()),
        "startup_s": round(load_s, 3),
        "first_run_s": round(first_s, 3),
        "run_to_both_overlays_s": round(statistics.median(times), 3),
        "runs_s": [round(t, 3) for t in times],
        # CPU seconds of this process per Run (all its threads): less moved by other processes than
        # wall time; on an idle machine wall time is at least this divided by the threads
        "run_cpu_s": round(statistics.median(cpu), 3),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        # other processes on a shared machine inflate every figure: the 1-min load before and after
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
