"""`dpseg eval`, `dpseg segment`, `dpseg report` and `dpseg bench eval`: stage three."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from dpseg.refine import DEFAULT_MIN_AREA

WEIGHTS_HELP = (
    "Encoder weights the checkpoint was trained with: a .safetensors file, an open_clip tag, or 'none' "
    "(default: the checkpoint's: carried in it, or recorded)."
)


def eval_command(
    checkpoint: Path = typer.Option(..., help="Checkpoint folder (OUT/checkpoint of `dpseg train`)."),
    dataset: Path = typer.Option(..., help="Prepared dataset folder (`dpseg data prepare` / `dpseg data synth`)."),
    out: Path = typer.Option(..., help="Output folder: metrics.json, per_class.csv, pred/, overlays/ (resumable)."),
    split: str = typer.Option("val", help="Dataset split."),
    bank: Path | None = typer.Option(None, help="Bank folder (default: the one the checkpoint was trained with)."),
    encoder_weights: str | None = typer.Option(None, help=WEIGHTS_HELP),
    passes: int = typer.Option(2, min=1, max=2, help="1: bank prompts; 2: also pass II (refined prompts)."),
    classes: str | None = typer.Option(None, help="Class subset: all, a declared one (seen, unseen) or ids '0,3'."),
    size: int | None = typer.Option(None, help="Model input size (default: the checkpoint's)."),
    min_area: int = typer.Option(
        DEFAULT_MIN_AREA, min=0, help="Pixels (of the model input) a class must own to be refined."
    ),
    crop: str = typer.Option("masked", help="masked (outside mask = CLIP mean) | bbox."),
    instances: int = typer.Option(0, min=0, help="Crop the K largest connected components per class (0: off)."),
    confidence: float = typer.Option(0.0, help="Pass II: crop only pixels whose pass-I probability is >= this."),
    margin: float = typer.Option(0.0, help="Pass II: ... and whose top-1 minus top-2 probability is >= this."),
    erode: int = typer.Option(0, min=0, help="Pass II: shrink each class mask by this many pixels before cropping."),
    gate: float = typer.Option(0.0, help="Pass II: refine a class only if its mean pass-I probability reaches this."),
    merge: str | None = typer.Option(
        None,
        help="Pass II: replace (all M slots) | mix | blend (--share) | add. Default: as the checkpoint was trained "
        "(mix at its --crop-prompts share, else replace).",
    ),
    share: float | None = typer.Option(
        None, help="mix: share of the M slots given to crops; blend: the crops' weight (default: see --merge)."
    ),
    fit: bool = typer.Option(
        False, "--fit/--no-fit", help="Encode each crop at the smallest multiple of 32 holding it."
    ),
    topk: int = typer.Option(0, min=0, help="Fast pass II: decode each image's k best pass-I classes (0: exact)."),
    oracle: bool = typer.Option(
        False, "--oracle", help="DIAGNOSTIC: also run pass II with crops cut from the ground truth (an upper bound)."
    ),
    bootstrap: int = typer.Option(1000, min=0, help="Paired bootstrap resamples for the pass II - pass I interval."),
    bootstrap_seed: int = typer.Option(0, help="Seed of the bootstrap resampling."),
    batch_size: int = typer.Option(4, min=1),
    num_workers: int = typer.Option(2, min=0, help="Image-reading worker processes."),
    class_chunk: int | None = typer.Option(None, min=1, help="Decode this many classes at a time (bounded memory)."),
    save_predictions: bool = typer.Option(False, "--save-predictions", help="Write pred/pass{1,2}/<id>.png."),
    overlays: Path | None = typer.Option(None, help="Run pass II from these stored overlays (no pass I)."),
    shard_size: int = typer.Option(64, min=1, help="Images per overlay shard (the unit of resuming)."),
    limit: int | None = typer.Option(None, min=1, help="Evaluate the first N images only."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    precision: str = typer.Option("fp32", help="fp32 (SED's) | bf16 | fp16 autocast; cost volumes stay fp32."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    as_json: bool = typer.Option(False, "--json", help="Print metrics.json."),
):
    """Evaluate a checkpoint: pass I (bank prompts) and pass II (prompts refined per image)."""
    from pipeline.evaluate.loop import EvalSettings, evaluate

    settings = EvalSettings(
        checkpoint=str(checkpoint),
        dataset=str(dataset),
        out=str(out),
        split=split,
        bank=str(bank) if bank else None,
        encoder_weights=encoder_weights,
        passes=passes,
        classes=classes,
        size=size,
        min_area=min_area,
        crop=crop,
        instances=instances,
        confidence=confidence,
        margin=margin,
        erode=erode,
        gate=gate,
        merge=merge,
        share=share,
        fit=fit,
        topk=topk,
        oracle=oracle,
        bootstrap=bootstrap,
        bootstrap_seed=bootstrap_seed,
        batch_size=batch_size,
        num_workers=num_workers,
        class_chunk=class_chunk,
        save_predictions=save_predictions,
        overlays=str(overlays) if overlays else None,
        shard_size=shard_size,
        limit=limit,
        device=device,
        precision=precision,
    )
    metrics = evaluate(settings, progress=progress)
    if os.environ.get("RANK", "0") != "0":  # under `accelerate launch` the main rank reports
        return
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    for p, scores in sorted(metrics["passes"].items()):
        miou = "n/a" if scores["miou"] is None else f"{scores['miou']:.2f}"
        chance = scores["uniform_random_miou"]
        typer.echo(
            f"pass {'I' * int(p):<2} mIoU {miou}  fwIoU {scores['fwiou'] or 0:.2f}  "
            f"pAcc {scores['pacc'] or 0:.2f}  "
            f"mAcc {scores['macc'] or 0:.2f}  ({scores['images']} images; uniform random "
            f"{0 if chance is None else chance:.2f})"
        )
    boot = metrics.get("paired_bootstrap")
    if boot and boot["ci95"]:
        low, high = boot["ci95"]
        typer.echo(
            f"pass II - pass I mIoU {boot['estimate']:+.2f}, 95% interval [{low:+.2f}, {high:+.2f}] "
            f"(paired bootstrap over {boot['images']} images, {boot['samples']} resamples)"
        )
    diag = metrics.get("diagnostics", {})
    if "pass2_oracle" in diag:
        share_closed = diag.get("share_of_oracle_gain_closed")
        typer.echo(
            f"diagnostic, oracle crops (ground truth): pass II mIoU {diag['pass2_oracle']['miou']:.2f}; "
            f"share of its gain closed by pass II: {'n/a' if share_closed is None else f'{100 * share_closed:.0f}%'}"
        )
    typer.echo(f"-> {out / 'metrics.json'}")


def segment_command(
    images: list[str] = typer.Argument(..., help="Image files (JPEG/PNG), folders of them, or quoted glob patterns."),
    classes: str = typer.Option(..., help='"cat, dog, sofa", a vocabulary name, or a .txt/.json file.'),
    checkpoint: Path = typer.Option(..., help="Checkpoint folder."),
    out: Path = typer.Option(Path("out/segment"), "-o", "--out", help="Output folder for the overlay PNGs."),
    bank: Path | None = typer.Option(None, help="Bank folder (default: the checkpoint's)."),
    encoder_weights: str | None = typer.Option(None, help=WEIGHTS_HELP),
    passes: int = typer.Option(2, min=1, max=2),
    size: int | None = typer.Option(None, help="Model input size (default: the checkpoint's)."),
    min_area: int = typer.Option(DEFAULT_MIN_AREA, min=0),
    crop: str = typer.Option("masked", help="masked | bbox"),
    generate: bool = typer.Option(False, "--generate", help="Generate prompt images for classes the bank lacks."),
    prompts: str | None = typer.Option(None, help="text | visual | dual (default: as the checkpoint was trained)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Segment your own images with your own class names; writes an overlay PNG per image (the
    model loads once for all of them)."""
    from pipeline.evaluate.segment import SegmentSettings, segment

    report = segment(
        SegmentSettings(
            images=list(images),
            classes=classes,
            checkpoint=str(checkpoint),
            out=str(out),
            bank=str(bank) if bank else None,
            encoder_weights=encoder_weights,
            passes=passes,
            size=size,
            min_area=min_area,
            crop=crop,
            generate=generate,
            device=device,
            prompts=prompts,
        ),
        progress=progress,
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    if report["text_only"]:
        typer.echo(f"text-only prompts (not in the bank): {', '.join(report['text_only'])}")
    for item in report["images"]:
        found = ", ".join(f"{d['class']} {100 * d['share']:.1f}%" for d in item["detected"])
        typer.echo(f"{item['image']}: {found}")
        typer.echo(f"  -> {item['output']}")


def report_command(
    dirs: list[Path] = typer.Argument(None, help="Eval output folders (each with metrics.json)."),
    out: Path = typer.Option(Path("out/report"), "-o", "--out", help="Folder for report.md and panels/."),
    labels: str | None = typer.Option(None, help="Comma-separated labels, one per folder (default: folder names)."),
    panels: int = typer.Option(4, min=0, help="Per-image panels for the first K images of each folder."),
    sweep: str | None = typer.Option(
        None,
        help="Instead of folders: a sweep's table from the DVC experiments "
        "(banks = Table 5, prompts = 2, guidance = 3, templates = 4).",
    ),
    params: Path = typer.Option(Path("params.yaml"), help="The pipeline's params file (with --sweep)."),
):
    """Markdown tables in the paper's form (Table 1, Table 5) and per-image panels; with --sweep, the
    table of an ablation sweep from the experiments that ran (`dvc exp run`), nothing re-run."""
    from dpseg.errors import UserError

    if sweep is not None:
        from dpseg.io import atomic_write_bytes
        from pipeline.analyze.sweeps import sweep_table

        if dirs:
            raise UserError("give eval folders or --sweep, not both")
        table = sweep_table(sweep, params)
        atomic_write_bytes(out / f"{sweep}.md", table.encode())
        typer.echo(table)
        typer.echo(f"-> {out / f'{sweep}.md'}")
        return
    if not dirs:
        raise UserError(
            "no eval folders given: `dpseg report out/eval/seen out/eval/unseen`, or `--sweep banks` "
            "for the table of the experiments"
        )
    from pipeline.evaluate.report import render_report

    names = [s.strip() for s in labels.split(",")] if labels else None
    result = render_report([str(d) for d in dirs], labels=names, out=str(out), panels=panels)
    typer.echo(result["markdown"])
    typer.echo(f"-> {result['path']} ({len(result['panels'])} panels)")


def bench_eval_command(
    encoder: str = typer.Option("tiny", help="Registered encoder (random weights)."),
    size: int = typer.Option(0, help="Input size (0: the encoder's default)."),
    classes: str = typer.Option("150,459,847", help="Comma-separated class counts."),
    class_chunk: int = typer.Option(64, min=1, help="Class chunk of the bounded-memory mode."),
    ratio_classes: int = typer.Option(150, min=1, help="Class count of the two-pass / one-pass ratio."),
    templates: int = typer.Option(80, min=1, max=80, help="Prompt templates M (cost-volume channels)."),
    batch: int = typer.Option(2, min=1, help="Images per step."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    repeats: int = typer.Option(3, min=1),
    isolate: bool = typer.Option(True, "--isolate/--no-isolate", help="CPU: a fresh process per case (peak memory)."),
    topk: str = typer.Option("16,8", help="Comma-separated k of the fast pass-II modes (topk<k>, topk<k>+fit)."),
    crop_channels: bool = typer.Option(
        False, "--crop-channels", help="Time a network built with crop_channels (the demo's decoder)."
    ),
    out: Path | None = typer.Option(None, "-o", "--out", help="Also write the JSON here (docs/bench/...)."),
):
    """Two-pass vs one-pass latency, and peak memory/latency against the class count."""
    from dpseg.io import atomic_write_json
    from pipeline.bench.eval import bench_eval

    result = bench_eval(
        encoder=encoder,
        size=size or None,
        classes=_positive_ints(classes, "--classes", allow_empty=True),
        class_chunk=class_chunk,
        ratio_classes=ratio_classes,
        device=device,
        repeats=repeats,
        templates=templates,
        batch=batch,
        isolate=isolate,
        topk=_positive_ints(topk, "--topk"),
        crop_channels=crop_channels,
    )
    if out:
        atomic_write_json(out, result)
    typer.echo(json.dumps(result, indent=2))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Adds this module's commands to the root app (and its benchmarks to `dpseg bench`)."""
    app.command("eval")(eval_command)
    app.command("segment")(segment_command)
    app.command("report")(report_command)
    bench_app.command("eval")(bench_eval_command)


def _positive_ints(text: str, option: str, allow_empty: bool = False) -> list[int]:
    from dpseg.errors import UserError

    items = [c.strip() for c in text.split(",") if c.strip()]
    if not all(c.isdigit() and int(c) > 0 for c in items) or not (items or allow_empty):
        raise UserError(f"{option} takes comma-separated positive integers, got {text!r}")
    return [int(c) for c in items]
