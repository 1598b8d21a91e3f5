"""`dpseg clip pretrain` (the demo's CLIP stage) and `dpseg bench all`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.clip.pretrain import ClipPretrainSettings

app = typer.Typer(help="The demo's CLIP: pretrain the tiny open_clip model on the shapes world.", no_args_is_help=True)
_D = ClipPretrainSettings()


@app.command("pretrain")
def pretrain_command(
    out: Path = typer.Option(Path(_D.out), "--out", help="Folder for tiny.safetensors, config.json, metrics.json."),
    steps: int = typer.Option(_D.steps, min=1, help="Optimiser steps."),
    batch_size: int = typer.Option(_D.batch_size, min=1, help="Images per step."),
    lr: float = typer.Option(_D.lr, help="Peak learning rate (AdamW, warm-up then cosine)."),
    templates_per_step: int = typer.Option(_D.templates_per_step, min=1, help="Templates captioned per step."),
    renders: int = typer.Option(_D.renders, min=1, help="Cached training renders per (category, template)."),
    photo_share: float = typer.Option(_D.photo_share, help="Share of the renders under photo conditions (0..1)."),
    small_size: int = typer.Option(_D.small_size, help="Input size of the first part of training (multiple of 32)."),
    small_fraction: float = typer.Option(_D.small_fraction, help="Share of the steps run at --small-size."),
    attribute_weight: float = typer.Option(_D.attribute_weight, help="Weight of the per-attribute losses."),
    seed: int = typer.Option(_D.seed),
    threads: int = typer.Option(_D.threads, min=0, help="torch threads (0: torch's default)."),
    device: str = typer.Option(_D.device, help="cpu | cuda (longer schedules in seconds on a GPU)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Pretrain the tiny CLIP (both towers) on rendered shapes + template captions; report zero-shot accuracy."""
    from pipeline.clip.pretrain import pretrain

    cfg = ClipPretrainSettings(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        templates_per_step=templates_per_step,
        renders=renders,
        photo_share=photo_share,
        small_size=small_size,
        small_fraction=small_fraction,
        attribute_weight=attribute_weight,
        seed=seed,
        threads=threads,
        device=device,
        out=str(out),
    )
    m = pretrain(cfg, progress=progress)
    attrs = ", ".join(f"{k} {v:.3f}" for k, v in m["attribute_accuracy"].items())
    typer.echo(
        f"zero-shot accuracy {m['zero_shot_accuracy']:.3f} over 48 categories (chance {m['chance']:.3f}) "
        f"on {m['images']} held-out renders; per attribute: {attrs}; "
        f"{m['photo']['zero_shot_accuracy']:.3f} on the same renders under photo conditions"
    )
    typer.echo(
        f"{m['steps']} steps in {m['train_s']:.0f} s ({m['train_s_per_step']:.3f} s/step), "
        f"total {m['total_s']:.0f} s; weights: {out / 'tiny.safetensors'}"
    )


def bench_all_command(
    out: Path = typer.Option(Path("results/bench.json"), "-o", "--out", help="Where the JSON goes."),
    only: str | None = typer.Option(None, help="Comma-separated subset: model,bank,train,eval,clip_pretrain."),
):
    """Every benchmark, sized for this machine, into one JSON (results/bench.json)."""
    from pipeline.bench.all import bench_all

    result = bench_all(out, [s for s in only.split(",") if s] if only else None)
    for name, entry in result["benchmarks"].items():
        status = f"error: {entry['error']}" if "error" in entry else "ok"
        typer.echo(f"{name:<14} {entry['wall_s']:>8.1f} s  {status}")
    typer.echo(f"machine: {json.dumps(result['machine'])}")
    typer.echo(f"wrote {out}")


def register(app_: typer.Typer, bench_app: typer.Typer) -> None:
    """Adds `dpseg clip ...` to the root app and `dpseg bench all` to the benchmarks."""
    app_.add_typer(app, name="clip")
    bench_app.command("all")(bench_all_command)
