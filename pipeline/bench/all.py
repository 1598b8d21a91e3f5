"""`dpseg bench all`: every benchmark of the project, one JSON (results/bench.json).

Each benchmark runs with settings sized for the machine it finds (CPU: the tiny encoder and
small inputs; GPU: the paper's encoder); a benchmark that fails is recorded with its one-line
error and the others still run. The figures are ratios and rates taken within each run, with
the machine they came from beside them.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpseg.errors import first_line
from dpseg.io import atomic_write_json


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average"] = list(os.getloadavg())  # a busy machine slows every figure
    except OSError:
        pass
    return info


def _clip_bench(steps: int = 6) -> dict[str, Any]:
    """Seconds per step of the demo's CLIP pretraining (64 px and the small size), no outputs kept."""
    import tempfile

    from pipeline.clip.pretrain import ClipPretrainSettings, pretrain

    with tempfile.TemporaryDirectory() as tmp:
        cfg = ClipPretrainSettings(steps=steps, renders=1, eval_renders=1, warmup=1, out=tmp)
        result = pretrain(cfg, progress=False)
    return {
        "steps": steps,
        "train_s_per_step": result["train_s_per_step"],
        "render_s": result["render_s"],
        "eval_s": result["eval_s"],
        "batch_size": cfg.batch_size,
    }


def benchmarks(gpu: bool) -> dict[str, Callable[[], dict]]:
    """name -> a call running it with settings for this machine."""
    device = "cuda" if gpu else "cpu"

    def model() -> dict:
        from pipeline.bench.model import bench_model

        if gpu:
            return bench_model("convnext-b", None, [150, 847], [1, 8], "fp16", device, 2, 5, None)
        return bench_model("tiny", None, [48, 150], [1], "fp32", device, 1, 3, None)

    def bank() -> dict:
        from pipeline.bench.bank import bench_bank

        if gpu:
            return bench_bank(
                "sd15-random", device, "auto", None, 25, [4], 4, (), None, "convnext-b", None, rounds=1, progress=False
            )
        return bench_bank("tiny-sd", device, "auto", None, 25, [4], 4, (), None, "tiny", None, rounds=1, progress=False)

    def train() -> dict:
        from pipeline.bench.train import bench_train

        return bench_train(
            encoder="convnext-b" if gpu else "tiny",
            size=768 if gpu else 64,
            classes=36,
            templates=4,
            batch_size=4,
            steps=5,
            rounds=1,
            num_workers=1,
            device=device,
            mixed_precision="fp32",
            data=None,
        )

    def evaluate() -> dict:
        from pipeline.bench.eval import bench_eval

        return bench_eval(
            encoder="convnext-b" if gpu else "tiny",
            size=None,
            classes=[150, 847] if gpu else [48, 150],
            class_chunk=64,
            ratio_classes=150 if gpu else 48,
            device=device,
            repeats=2,
        )

    return {"model": model, "bank": bank, "train": train, "eval": evaluate, "clip_pretrain": _clip_bench}


def bench_all(out: str | Path = "results/bench.json", only: list[str] | None = None) -> dict[str, Any]:
    gpu = torch.cuda.is_available()
    runs = benchmarks(gpu)
    unknown = sorted(set(only or []) - set(runs))
    if unknown:
        from dpseg.errors import UserError

        raise UserError(f"unknown benchmarks {unknown}; known: {', '.join(runs)}")
    result: dict[str, Any] = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "benchmarks": {},
    }
    for name, run in runs.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            entry = {"result": run()}
        except Exception as err:  # one broken benchmark must not hide the others' figures
            entry = {"error": f"{type(err).__name__}: {first_line(err)}"}
        entry["wall_s"] = round(time.perf_counter() - start, 2)
        result["benchmarks"][name] = entry
    atomic_write_json(out, result)
    return result
