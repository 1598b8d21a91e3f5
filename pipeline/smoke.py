"""`dpseg demo`, a smoke check (the main job is `dvc repro`), and the demo report.

After the bank exists, the network on
the bank's encoder (tiny, random init, no download) segments a synthetic `shapes` scene with
real text prompts and the bank's visual prompts. Without a bank, random visual prompts stand in.

The network is untrained (training is a later stage), so the accuracy it prints is chance
level: the demo shows every piece running end to end, not a result."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dpseg.data.shapes import SHAPES_CATEGORIES, render_scene
from dpseg.model import DPSegConfig, VisualPrompts, build_dpseg
from dpseg.model.summary import model_summary, random_prompts


def run_demo(size: int = 128, seed: int = 0, bank_dir: str | Path | None = None) -> dict:
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


# --- the demo report (issue 11, item 5) ------------------------------------------------------
# text-only / visual-only / dual prompts (the `prompts` sweep's group a), each trained on the seen
# categories and evaluated on seen and unseen, pass I and pass II, with the command that made it.
REPORT_POINTS = ("text", "visual", "dual")
PARAGRAPH_PLACEHOLDER = (
    "_What the numbers say about the paper's claims at this scale (text vs visual vs dual, "
    "pass II vs pass I, seen vs unseen), including where they do not hold: written by whoever "
    "ran the experiments above._"
)


def demo_report(
    params_file: str | Path = "params.yaml",
    run: bool = False,
    out: str | Path = "out/report/demo.md",
    paragraph: str | None = None,
    dvc: str | None = None,
    echo=print,
) -> dict:
    """Runs (with `run`) the missing text/visual/dual experiments as `dvc exp run`s, then writes
    the demo report: one row per prompt mode, seen/unseen x pass I/II mIoU + the uniform-random
    baseline, each with its command. Experiments are found by their parameters (pipeline.analyze.sweeps),
    so ones run by hand count too."""
    from dpseg.io import atomic_write_bytes
    from pipeline.analyze import sweeps

    sweep = sweeps.SWEEPS.get("prompts")
    points = [p for p in sweep.points if p.label in REPORT_POINTS]
    selected = sweeps.Sweep("demo-prompts", sweep.table, sweep.title, tuple(points), sweep.notes)
    if run:
        name = "demo-prompts"
        registered = name in sweeps.SWEEPS.names()
        if not registered:
            sweeps.SWEEPS.register(name, selected)
        result = sweeps.run_sweep(name, params_file, dvc=dvc, echo=echo)
        if result["failed"]:
            from dpseg.errors import UserError

            raise UserError(f"experiments failed: {', '.join(result['failed'])}; see `dvc exp show`")
    records = sweeps.read_records(dvc)
    base = sweeps.load_params(params_file)
    planned = sweeps.plan_sweep(selected, base, records, sweeps.profile_of(base))
    sets = ("seen", "unseen")
    header = (
        "| prompts | "
        + " | ".join(f"{s} pass {p}" for s in sets for p in ("I", "II"))
        + " | "
        + " | ".join(f"{s} uniform" for s in sets)
        + " | command |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for item in planned:
        m = item.record.metrics if item.record is not None and item.status == "done" else {}

        def f(key: str, m: dict = m) -> str:
            value = m.get(key)
            return "—" if value is None else f"{value:.1f}"

        cells = [f(f"metrics/eval/{s}.json:pass{p}.miou") for s in sets for p in (1, 2)]
        cells += [f(f"metrics/eval/{s}.json:pass1.uniform_random_miou") for s in sets]
        command = "dvc exp run " + " ".join(sweeps.set_args(item.point))
        lines.append(f"| {item.point.label} | " + " | ".join(cells) + f" | `{command}` |")
    text = "\n".join(
        [
            "# dpseg demo: text / visual / dual prompts, pass I / pass II, seen / unseen",
            "",
            "mIoU (%) on the shapes val split; `seen` = the 36 training categories, `unseen` = the 12 "
            "held-out ones evaluated with their own vocabulary; `uniform` = a uniform-random predictor on "
            "the same ground truth. Reproduce: `python -m pipeline.smoke --run`.",
            "",
            *lines,
            "",
            paragraph or PARAGRAPH_PLACEHOLDER,
            "",
        ]
    )
    atomic_write_bytes(out, text.encode())
    return {"markdown": text, "path": str(out)}


if __name__ == "__main__":
    import argparse
    import sys

    from dpseg.errors import UserError, error_line

    parser = argparse.ArgumentParser(prog="python -m pipeline.smoke", description="the demo report")
    parser.add_argument("--run", action="store_true", help="run the missing experiments first (dvc exp run)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="out/report/demo.md")
    parser.add_argument("--paragraph", default=None, help="the closing paragraph (text)")
    args = parser.parse_args()
    try:
        print(demo_report(args.params, run=args.run, out=args.out, paragraph=args.paragraph)["markdown"])
    except (UserError, OSError) as err:
        print(f"Error: {error_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
