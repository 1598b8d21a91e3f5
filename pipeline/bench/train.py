"""`dpseg bench train`: the cost of a training step, ratios taken within one run.

Cases, alternated `rounds` times (the fastest round of each is kept):
- loader: the real input path (SegmentationDataset + SED's train transform in DataLoader
  workers, the bank's prototypes) feeding the dual-prompt step;
- memory: the same step on batches already in memory (the input path's floor);
- text: the SED-equivalent text-only network (prompt_mode text, upsampled-cost guidance) on
  the in-memory batches.
Reported: seconds per step, loader/memory and dual/text ratios, peak memory (per case on a GPU;
the process's peak RSS on a CPU, which only grows). Then the memory case once per precision
(`precisions`; default fp32 and bf16 on a CPU, fp32, bf16 and fp16 on a GPU): seconds per step
and the speed-up over fp32 (SED trains in fp32; the cost volumes and the loss stay fp32 in each).

The step is the training step of pipeline/train/loop.py: forward with the aux heads, SED's deep
supervision BCE, backward, full-model gradient clipping, AdamW.
"""

from __future__ import annotations

import contextlib
import resource
import tempfile
import time
from pathlib import Path

import torch

from dpseg.data import shapes


def _world(
    root: Path, size: int, classes: int, templates: int, data: Path | None, with_bank: bool = True
) -> tuple[Path, Path | None, list[int]]:
    from bank.build import BuildSettings, build_bank
    from dpseg.data.synth import write_shapes_benchmark

    ids = shapes.SEEN_IDS[:classes]
    if data is None:
        data = root / "data"
        write_shapes_benchmark(data, images=32, size=size, val_images=1, progress=False)
    if not with_bank:
        return data, None, ids
    names = root / "names.txt"
    names.write_text("".join(shapes.SHAPES_CATEGORIES[i] + "\n" for i in ids))
    bank = root / "bank"
    build_bank(
        BuildSettings(
            out=bank,
            generator="procedural",
            vocab=[str(names)],
            encoder="tiny",
            encoder_weights=None,
            encode_size=size,
            templates=templates,
            batch_size=32,
            progress=False,
        )
    )
    return data, bank, ids


def bench_train(
    encoder: str = "tiny",
    size: int = 64,
    classes: int = 36,
    templates: int = 4,
    batch_size: int = 4,
    steps: int = 20,
    rounds: int = 2,
    num_workers: int = 1,
    device: str = "auto",
    mixed_precision: str = "fp32",
    data: Path | None = None,
    warmup: int = 2,
    precisions: str = "all",
) -> dict:
    from bank.reader import Bank
    from dpseg.data.readers import SegmentationDataset
    from dpseg.errors import UserError
    from dpseg.model import DPSegConfig, VisualPrompts, build_dpseg
    from dpseg.model.loss import deep_supervision_bce
    from pipeline.train.data import StreamLayout, train_loader
    from pipeline.train.loop import resolve_precision

    # 1. settings
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if encoder != "tiny" and device == "cpu":
        raise UserError(f"bench train with encoder {encoder!r} is meant for a GPU: pass --device cuda")
    if not 1 <= classes <= len(shapes.SEEN_IDS):
        raise UserError(f"--classes must be between 1 and {len(shapes.SEEN_IDS)} (the seen shapes classes)")
    precision = resolve_precision(mixed_precision, device == "cuda")
    dtypes = {"fp32": None, "no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[precision]
    compared = precision_list(precisions, device)
    with tempfile.TemporaryDirectory(prefix="dpseg-bench-train-") as tmp:
        # 2. a world: shapes data, and for the tiny encoder a procedural bank (another encoder gets random
        #    prompts of the right shapes: a tiny bank rendered at its crop size would cost minutes, unused)
        data_dir, bank_dir, ids = _world(Path(tmp), size, classes, templates, data, with_bank=encoder == "tiny")
        dataset = SegmentationDataset(data_dir, "train")
        names = [shapes.SHAPES_CATEGORIES[i] for i in ids]
        # 3. the networks: dual (DPSeg) and text-only (SED-equivalent)
        torch.manual_seed(0)
        dual = build_dpseg(DPSegConfig(encoder=encoder, templates=templates), weights=None, device=device).train()
        torch.manual_seed(0)
        text_only = build_dpseg(
            DPSegConfig(encoder=encoder, templates=templates, prompt_mode="text", visual_guidance="upsampled-cost"),
            weights=None,
            device=device,
        ).train()
        text = dual.encode_text(names).to(device)
        if encoder == "tiny":
            protos = Bank(bank_dir).prototypes(names, "tiny", templates, encode_size=size)
            visual = VisualPrompts(protos.embedding, {s: protos.pooled[s] for s in dual.cfg.guidance_strides})
        else:  # prompts of the right shapes, random values
            from dpseg.model.summary import random_prompts

            text, visual = random_prompts(dual, classes)
            text = text.to(device)
        visual = visual.to(device)
        # 4. inputs: the real loader, and the same batches held in memory
        total = warmup + steps
        layout = StreamLayout(batch_size, batch_size, 1, 1, 0)
        loader = train_loader(
            dataset, ids, size, 0, layout, 0, total * rounds, num_workers, pin_memory=device == "cuda"
        )
        batches = iter(loader)
        held = [next(iter(train_loader(dataset, ids, size, 0, layout, i, i + 1, 0, False))) for i in range(4)]

        def step(model, opt, images, labels, prompts, dtype=dtype):
            images = images.to(device, non_blocking=True).float().div_(255)
            labels = labels.to(device, non_blocking=True)
            autocast = torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()
            with autocast:
                logits, aux = model(model.image_encoder.normalize(images), text=text, visual=prompts, aux=True)
            loss = deep_supervision_bce(logits.float(), [a.float() for a in aux], labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.01)
            opt.step()
            opt.zero_grad(set_to_none=True)

        opts = {id(m): torch.optim.AdamW(m.param_groups(2e-4, 1e-4)) for m in (dual, text_only)}
        cases = {
            "loader": (dual, visual, lambda i: next(batches)),
            "memory": (dual, visual, lambda i: held[i % len(held)]),
            "text": (text_only, None, lambda i: held[i % len(held)]),
        }
        # 5. time the cases in alternation
        best: dict[str, float] = {}
        peak: dict[str, int | None] = {}
        for _ in range(rounds):
            for name, (model, prompts, source) in cases.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                for i in range(total):
                    if i == warmup:
                        if device == "cuda":
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                    images, labels = source(i)
                    step(model, opts[id(model)], images, labels, prompts)
                if device == "cuda":
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - start) / steps
                best[name] = min(best.get(name, float("inf")), seconds)
                peak[name] = torch.cuda.max_memory_allocated() if device == "cuda" else None
        # 6. the in-memory dual step once per precision, alternated like the cases
        by_precision: dict[str, float] = {}
        precision_peak: dict[str, int | None] = {}
        for _ in range(rounds):
            for name in compared:
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                for i in range(total):
                    if i == warmup:
                        if device == "cuda":
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                    images, labels = held[i % len(held)]
                    step(dual, opts[id(dual)], images, labels, visual, dtype=dtypes[name])
                if device == "cuda":
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - start) / steps
                by_precision[name] = min(by_precision.get(name, float("inf")), seconds)
                precision_peak[name] = torch.cuda.max_memory_allocated() if device == "cuda" else None
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    result = {
        "encoder": encoder,
        "size": size,
        "classes": classes,
        "templates": templates,
        "batch_size": batch_size,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "mixed_precision": precision,
        "steps": steps,
        "rounds": rounds,
        "num_workers": num_workers,
        "seconds_per_step": {k: round(v, 5) for k, v in best.items()},
        "ratio_loader_vs_memory": round(best["loader"] / best["memory"], 4),
        "ratio_dual_vs_text": round(best["memory"] / best["text"], 4),
        "targets": {"ratio_loader_vs_memory": 1.05, "ratio_dual_vs_text": 1.25},
        "precisions": {
            name: {"seconds_per_step": round(s, 5), "speedup_vs_fp32": round(by_precision["fp32"] / s, 4)}
            for name, s in by_precision.items()
        },
    }
    if device == "cuda":
        for name, value in precision_peak.items():
            result["precisions"][name]["peak_memory_bytes"] = value
    if device == "cuda":
        result["peak_memory_bytes"] = peak
        result["hours_for_80k_steps"] = round(best["loader"] * 80_000 / 3600, 2)
    else:
        result["peak_rss_bytes"] = rss
    return result


def precision_list(precisions: str, device: str) -> list[str]:
    """`all`: what the device runs (fp32 and bf16 on a CPU; fp16 too on a GPU, bf16 where the GPU
    has it); else a comma list. fp32 always comes first: the speed-ups are over it."""
    from dpseg.errors import UserError

    if precisions == "all":
        names = ["fp32", "bf16", "fp16"] if device == "cuda" else ["fp32", "bf16"]
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            names.remove("bf16")
    else:
        names = [p.strip() for p in precisions.split(",") if p.strip()]
    bad = [p for p in names if p not in ("fp32", "bf16", "fp16")]
    if bad:
        raise UserError(f"--precisions: {', '.join(bad)} not one of fp32, bf16, fp16 (or all)")
    if "fp16" in names and device != "cuda":
        raise UserError("--precisions fp16 needs a GPU; on the CPU compare fp32 and bf16")
    return ["fp32", *[p for p in dict.fromkeys(names) if p != "fp32"]]
