"""`dpseg analyze gap|heatmap|sweep`: the paper's analyses (§3.1, §3.2, Fig. 8) and ablation
tables 2-5 as commands. docs/analyses.md defines every quantity."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="The paper's analyses: modality gap, cost heatmaps, ablation sweeps.", no_args_is_help=True)


@app.command()
def gap(
    bank: Path = typer.Option(..., help="Bank folder (its visual prompts, encoder weights, templates, encode size)."),
    encoder: str = typer.Option(..., help="Encoder whose features the bank holds: convnext-b, convnext-l, tiny."),
    images: str = typer.Option(..., help="Prepared dataset folder, or its name under out/data/ or data/."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: gap.json, pairs.csv and two figures."),
    encoder_weights: str | None = typer.Option(None, help="Default: the weights the bank was encoded with."),
    split: str | None = typer.Option(None, help="Dataset split (default val, else the first)."),
    classes: str | None = typer.Option(None, help="Subset (seen, unseen, all), ids '0,3', or names 'cat, dog'."),
    samples: int = typer.Option(200, min=2, help="(region, class) pairs to sample."),
    min_area: float = typer.Option(0.01, min=0.0, max=1.0, help="Fraction of the image a class must cover."),
    seed: int = typer.Option(0, help="Seed of the item order."),
    encode_size: int | None = typer.Option(None, min=8, help="Bank features group (default: its only/default size)."),
    batch_size: int = typer.Option(32, min=1),
    device: str = typer.Option("cpu"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Cosine similarity of image regions to text, visual and dual prompts; modality centroids (Fig. 1, 2)."""
    from pipeline.analyze.gap import MODALITIES, GapSettings, run_gap

    settings = GapSettings(
        bank=str(bank),
        encoder=encoder,
        images=images,
        out=str(out),
        encoder_weights=encoder_weights,
        split=split,
        classes=classes,
        samples=samples,
        min_area=min_area,
        seed=seed,
        encode_size=encode_size,
        batch_size=batch_size,
        device=device,
    )
    result = run_gap(settings, progress=progress)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    typer.echo(f"{result['pairs']} pairs, {result['classes']} classes, {result['templates']} templates -> {out}")
    typer.echo(f"{'':<8}{'mean cos':>10}{'centroid dist':>15}{'paper':>8}")
    for m in MODALITIES:
        s = result["summary"][m]
        typer.echo(
            f"{m:<8}{s['mean_similarity']:>10.3f}{s['centroid_distance']:>15.3f}"
            f"{result['paper_centroid_distance'][m]:>8.2f}"
        )


@app.command()
def heatmap(
    image: Path = typer.Argument(..., help="A photo (JPEG/PNG)."),
    classes: str = typer.Option(..., help='Class names separated by commas, e.g. "bed, mirror".'),
    bank: Path = typer.Option(..., help="Bank folder holding visual prompts for those classes."),
    encoder: str | None = typer.Option(None, help="Encoder (default: the checkpoint's; required without one)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output PNG (its data beside it as JSON)."),
    encoder_weights: str | None = typer.Option(None, help="Default: the weights the bank was encoded with."),
    checkpoint: Path | None = typer.Option(None, help="Trained checkpoint: its towers, and OUT-stages.png (Fig. 8)."),
    size: int | None = typer.Option(None, min=32, help="Model input size (default: the encoder's)."),
    device: str = typer.Option("cpu"),
):
    """Per-pixel cost maps of text, visual and dual prompts side by side (Fig. 3; Fig. 8 with --checkpoint)."""
    from pipeline.analyze.heatmap import run_heatmap

    result = run_heatmap(image, classes, bank, encoder, out, encoder_weights, checkpoint, size, device)
    ranges = ", ".join(f"{k} [{lo:.2f}, {hi:.2f}]" for k, (lo, hi) in result["range"].items())
    typer.echo(f"{out}: {len(result['classes'])} classes x (text, visual, dual); cost ranges {ranges}")
    if "stages" in result:
        typer.echo(
            f"{result['stages']['figure']}: visual cost volumes at strides {', '.join(result['stages']['range'])}"
        )


@app.command()
def sweep(
    name: str | None = typer.Argument(None, help="prompts (Table 2), guidance (3), templates (4), banks (5)."),
    queue_only: bool = typer.Option(False, "--queue-only", help="Queue the missing experiments and stop."),
    queue: bool = typer.Option(False, "--queue", help="Queue them and start DVC queue workers (default: one by one)."),
    jobs: int = typer.Option(1, min=1, help="Queue workers with --queue."),
    table_only: bool = typer.Option(False, "--table-only", help="Only render the table from finished experiments."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and the dvc commands; run nothing."),
    metric: str = typer.Option("miou", help="Metric (last key, regex) shown in the table."),
    params: Path = typer.Option(Path("params.yaml"), help="The pipeline's params file."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write the table (Markdown) and the plan (JSON)."),
):
    """Run an ablation sweep as DVC experiments (skipping finished ones), then print its table."""
    from dpseg.errors import UserError
    from pipeline.analyze import sweeps

    if name is None:
        for n in sweeps.SWEEPS.names():
            s = sweeps.SWEEPS.get(n)
            typer.echo(f"{n:<10} {s.table}: {s.title} ({len(s.points)} points)")
        return
    if queue and queue_only:
        raise UserError("--queue and --queue-only exclude each other: --queue-only queues without starting workers")
    run = None
    if not table_only:
        runner = sweeps.run_command
        if dry_run:
            runner = lambda args: type("Done", (), {"returncode": 0})()  # noqa: E731
        run = sweeps.run_sweep(
            name, params, queue_only=queue_only, queue=queue, jobs=jobs, runner=runner, echo=typer.echo
        )
    table = None
    if not (queue or queue_only or dry_run):
        table = render_table(name, params, metric)
        typer.echo("")
        typer.echo(table)
    if out is not None:
        from dpseg.io import atomic_write_bytes, atomic_write_json

        out.mkdir(parents=True, exist_ok=True)
        if table is not None:
            atomic_write_bytes(out / f"{name}.md", table.encode())
        if run is not None:
            atomic_write_json(out / f"{name}.json", run)
    if run is not None and run["failed"]:
        raise UserError(
            f"sweep {name}: experiment(s) {', '.join(run['failed'])} failed (dvc's output is above); "
            "fix the cause and run the same command again: finished experiments are not redone"
        )


def render_table(name: str, params: Path, metric: str) -> str:
    from pipeline.analyze.sweeps import sweep_table

    return sweep_table(name, params, metric=metric)


def register(app_: typer.Typer, bench_app: typer.Typer) -> None:
    """Adds `dpseg analyze ...` to the root app (no benchmarks)."""
    app_.add_typer(app, name="analyze")
