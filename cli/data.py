"""`dpseg data ...`: vocabularies, preparing the public benchmarks, the synthetic benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dpseg.data.synth import DEFAULT_IMAGES, DEFAULT_SEED, DEFAULT_SIZE

app = typer.Typer(help="data commands: vocabularies, dataset preparation, synthetic benchmark", no_args_is_help=True)
vocab_app = typer.Typer(help="class-name vocabularies", no_args_is_help=True)
app.add_typer(vocab_app, name="vocab")


@vocab_app.command("list")
def vocab_list(as_json: bool = typer.Option(False, "--json", help="print {name: class count} as JSON")) -> None:
    """The registered vocabularies and their class counts."""
    from dpseg.data.vocab import vocab_counts

    counts = vocab_counts()
    if as_json:
        typer.echo(json.dumps(counts, indent=1))
        return
    for name, count in counts.items():
        typer.echo(f"{name:12s} {count:5d}")


@vocab_app.command("show")
def vocab_show(
    name: str = typer.Argument(..., help="registered vocabulary, or a .txt/.json file of class names"),
    as_json: bool = typer.Option(False, "--json", help="print the list as JSON"),
) -> None:
    """The class names of a vocabulary, in label order."""
    from dpseg.data.vocab import load_vocab

    names = load_vocab(name)
    if as_json:
        typer.echo(json.dumps(names, indent=1, ensure_ascii=False))
        return
    for index, class_name in enumerate(names):
        typer.echo(f"{index:4d}  {class_name}")


@app.command("prepare")
def prepare(
    name: str = typer.Argument(..., help="dataset: coco-stuff, ade-150, ade-847, pc-59, pc-459, voc-20 (or shapes)"),
    src: Path | None = typer.Option(None, "--src", help="folder holding the official raw download"),
    out: Path = typer.Option(..., "--out", help="folder for the prepared layout (new, or a previous run to resume)"),
    split: list[str] | None = typer.Option(None, "--split", help="split(s) to prepare (default: the evaluated ones)"),
    on_error: str = typer.Option("stop", "--on-error", help="a corrupt or missing file: stop, or skip it (recorded)"),
    workers: int = typer.Option(4, "--workers", min=1, help="parallel conversion threads"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Convert a raw benchmark download into the prepared layout (idempotent, resumable)."""
    from dpseg.data.datasets import DATASETS, prepare_dataset
    from dpseg.errors import UserError

    spec = DATASETS.get(name)
    if src is None and spec.collect is not None:
        raise UserError(f"--src is required for {name}: the folder holding {spec.raw}")
    report = prepare_dataset(name, src or Path("."), out, split, on_error=on_error, progress=progress, workers=workers)
    _print_report(report)


@app.command("synth")
def synth(
    out: Path = typer.Option(..., "--out", help="folder for the benchmark (prepared layout)"),
    images: int = typer.Option(DEFAULT_IMAGES, "--images", help="train images (seen categories only)"),
    val_images: int | None = typer.Option(None, "--val-images", help="val images, all categories (default: --images)"),
    size: int = typer.Option(DEFAULT_SIZE, "--size", help="image side in pixels"),
    seed: int = typer.Option(DEFAULT_SEED, "--seed"),
    background: bool = typer.Option(
        False, "--background/--no-background", help="label the canvas as a class (vocabulary shapes-background)"
    ),
    scene_style: str = typer.Option(
        "plain", "--scene-style", help="plain | photo (per-scene light, cast, blur, clutter)"
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Write the synthetic `shapes` open-vocabulary benchmark (deterministic)."""
    from dpseg.data.synth import write_shapes_benchmark

    _print_report(
        write_shapes_benchmark(
            out,
            images=images,
            size=size,
            seed=seed,
            val_images=val_images,
            progress=progress,
            background=background,
            scene_style=scene_style,
        )
    )


@app.command("info")
def info(root: Path = typer.Argument(..., help="a prepared dataset folder")) -> None:
    """Summary of a prepared dataset."""
    from dpseg.data.layout import read_layout

    layout = read_layout(root)
    typer.echo(
        f"{layout.dataset}: vocabulary {layout.vocabulary} ({layout.num_classes} classes), ignore {layout.ignore_index}"
    )
    for split, ids in layout.splits.items():
        skipped = len(layout.skipped.get(split, []))
        typer.echo(f"  {split}: {len(ids)} images" + (f", {skipped} skipped" if skipped else ""))


def _print_report(report) -> None:
    layout = report.info
    counts = ", ".join(f"{split} {len(ids)}" for split, ids in layout.splits.items())
    typer.echo(f"{layout.dataset} -> {layout.root}: {counts} (written {report.written}, already done {report.resumed})")
    for problem in report.skipped:
        typer.echo(f"skipped {problem['split']}/{problem['id']}: {problem['file']}: {problem['reason']}", err=True)
