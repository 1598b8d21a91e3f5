"""`dpseg bank ...`: build, encode, derive, info, verify, show."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="The visual-prompt bank: generate, encode and inspect prompt images.", no_args_is_help=True)


def _echo_json(report: dict) -> None:
    typer.echo(json.dumps(report, indent=2, sort_keys=True, default=str))


@app.command()
def build(
    generator: str = typer.Option(
        ..., help="Registered generator: sd15, sd3, layerdiffuse, tiny-sd, procedural, sd15-random."
    ),
    vocab: list[str] = typer.Option(
        ..., help="Vocabulary name(s) (coco-stuff, ade-150, ...; comma-separated or repeated) or a .txt/.json file."
    ),
    encoder: str = typer.Option(
        ..., help="CLIP encoder whose prompt tower encodes the images: convnext-b, convnext-l, tiny."
    ),
    out: Path = typer.Option(..., help="Bank folder (created, or resumed/extended when it exists)."),
    templates: int = typer.Option(80, min=1, max=80, help="Use the first K of the 80 templates."),
    resolution: int | None = typer.Option(
        None, min=8, help="Image size (default per generator: 768 for sd15/sd3/layerdiffuse)."
    ),
    steps: int | None = typer.Option(None, min=1, help="Denoising steps (default 25; sd3 28)."),
    guidance: float | None = typer.Option(None, help="Classifier-free guidance scale (default 7.5; sd3 7.0)."),
    scheduler: str | None = typer.Option(None, help="dpm++ (default), ddim, euler or native."),
    negative_prompt: str | None = typer.Option(None, help="Negative prompt (default none)."),
    batch_size: int = typer.Option(8, min=1, help="Images per generator call (does not change any image)."),
    seed: int = typer.Option(0, help="Base seed; each entry's seed is a stable hash of (prompt, settings, seed)."),
    model: str | None = typer.Option(None, help="Weights: hub id, local diffusers folder or .safetensors file."),
    model_config: str | None = typer.Option(
        None, help="Single .safetensors file: its diffusers config folder or hub id."
    ),
    encoder_weights: str = typer.Option(
        "default", help="Encoder weights: 'default' (its open_clip tag), a file/folder, or 'none' (random)."
    ),
    encode_size: int | None = typer.Option(
        None,
        help="Size prompt images are resized to before the prompt tower (default: the encoder's segmentation "
        "input size, 768 for convnext-b/l; 320 is the paper's ablation).",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda (under accelerate launch: each rank's GPU)."),
    dtype: str = typer.Option("auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16."),
    compile: list[str] = typer.Option(
        [],
        "--compile",
        help="torch.compile 'unet' and/or 'vae', and/or 'channels-last' (speed only; images equal up to float error).",
    ),
    safety_checker: bool | None = typer.Option(
        None, "--safety-checker/--no-safety-checker", help="SD's safety checker (default: as the model ships it)."
    ),
    t5: bool | None = typer.Option(None, "--t5/--no-t5", help="sd3: use the T5 text encoder (default on)."),
    layer_weights: str | None = typer.Option(
        None, help="layerdiffuse: folder (or hub repo) with the LayerDiffuse SD1.5 files."
    ),
    shard_size: int = typer.Option(
        256, min=1, help="Images per tar shard (work lost to a kill is at most one shard per rank)."
    ),
    shard_index: int = typer.Option(0, min=0, help="This job's index in a scheduler job array."),
    num_shards: int = typer.Option(1, min=1, help="Jobs in the job array (work split by entry key, no rendezvous)."),
    retries: int = typer.Option(2, min=0, help="Retries with derived seeds for black/NaN/constant images."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Generate the missing entries of a bank, encode them, store them (resumable)."""
    from bank.build import BuildSettings, build_bank
    from bank.generators.base import GeneratorSettings

    options = GeneratorSettings(
        model=model,
        resolution=resolution,
        steps=steps,
        guidance=guidance,
        scheduler=scheduler,
        model_config=model_config,
        negative_prompt=negative_prompt,
        safety_checker=safety_checker,
        t5=t5,
        device=device,
        dtype=dtype,
        compile=tuple(c for item in compile for c in item.split(",") if c),
        extra={"layer_weights": layer_weights} if layer_weights else {},
    )
    opts = BuildSettings(
        out=out,
        generator=generator,
        vocab=vocab,
        encoder=encoder,
        encoder_weights=_weights(encoder_weights),
        encode_size=encode_size,
        templates=templates,
        seed=seed,
        batch_size=batch_size,
        shard_size=shard_size,
        shard_index=shard_index,
        num_shards=num_shards,
        retries=retries,
        generator_options=options,
        progress=progress,
    )
    report = build_bank(opts)
    if "merge" not in report:
        return  # not the main rank
    if as_json:
        _echo_json(report)
    else:
        typer.echo(
            f"bank {out}: {report['ok']} images made, {report['failed']} failed, "
            f"{report['already_done']} already there "
            f"({report['planned']} planned, {report['recovered_images']} re-encoded after a kill)"
        )


@app.command()
def encode(
    bank_dir: Path = typer.Argument(..., help="Bank folder."),
    encoder: str = typer.Option(..., help="Encoder to add features for."),
    encoder_weights: str = typer.Option("default", help="'default', a file/folder, or 'none' (random)."),
    encode_size: int | None = typer.Option(
        None, help="Size prompt images are resized to (default: the encoder's segmentation input size)."
    ),
    batch_size: int = typer.Option(32, min=1, help="Images per tower call (on a GPU: 128-512)."),
    num_workers: int | None = typer.Option(
        None, min=0, help="PNG-decoding processes per rank (default: the cores less one, at most 8)."
    ),
    device: str = typer.Option("auto"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Add a features group (another encoder or encode size) from the stored images (no regeneration);
    also repairs damaged features of that group."""
    from bank.encode import encode_bank

    report = encode_bank(
        bank_dir,
        encoder,
        _weights(encoder_weights),
        device,
        batch_size,
        progress,
        encode_size=encode_size,
        workers=num_workers,
    )
    if "merge" in report:
        typer.echo(
            f"bank {bank_dir}: {report['images']} images encoded with {encoder} at {report['encode_size']} px "
            f"({report['shards']} shards)"
        )


@app.command()
def derive(
    source: Path = typer.Option(..., "--from", help="Source bank folder."),
    noise: float = typer.Option(..., help="Noise ratio r in [0, 1] (docs/bank.md defines the blend)."),
    out: Path = typer.Option(..., help="New bank folder."),
    encoder: list[str] = typer.Option([], help="Encoders to compute (default: the source bank's)."),
    encoder_weights: str = typer.Option("source", help="'source' (as the source bank), 'default', a file, or 'none'."),
    batch_size: int = typer.Option(32, min=1),
    device: str = typer.Option("auto"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Derive a Gaussian-noise bank `noise:<r>` from an existing bank's images, then encode it."""
    from bank.derive import derive_noise_bank

    report = derive_noise_bank(
        source, noise, out, encoder or None, _weights(encoder_weights), batch_size, device=device, progress=progress
    )
    if "merge" in report:
        typer.echo(
            f"bank {out}: noise:{noise:g} derived from {source}: {report['ok']} images, {report['failed']} failed"
        )


@app.command()
def info(
    bank_dir: Path = typer.Argument(..., help="Bank folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """What a bank holds: entries, categories, templates, failures, generator, encoders."""
    from bank.inspection import info as bank_info

    report = bank_info(bank_dir)
    if as_json:
        _echo_json(report)
        return
    for key in (
        "bank",
        "generator",
        "settings_hash",
        "entries",
        "failed",
        "missing",
        "categories",
        "templates",
        "encoders",
        "features",
        "shards",
    ):
        value = ", ".join(report[key]) if key == "features" else report[key]
        typer.echo(f"{key:<14} {value}")


@app.command()
def verify(
    bank_dir: Path = typer.Argument(..., help="Bank folder."),
    quick: bool = typer.Option(False, "--quick", help="Check PNG signatures only instead of decoding every image."),
):
    """Check manifest vs shards vs features, decoding every image; exit 1 listing every problem."""
    from bank.inspection import info as bank_info
    from bank.inspection import verify as bank_verify

    problems = bank_verify(bank_dir, quick=quick)
    if problems:
        for line in problems:
            typer.echo(line)
        typer.echo(
            f"Error: bank {bank_dir} has {len(problems)} problems; the same `dpseg bank build` command repairs them",
            err=True,
        )
        raise typer.Exit(1)
    report = bank_info(bank_dir)
    done, planned = report["entries"] + report["failed"], report["planned"]
    if done == 0:
        typer.echo(
            f"Error: bank {bank_dir} is empty (0 of {planned} entries); make them with `dpseg bank build`", err=True
        )
        raise typer.Exit(1)
    more = f", {report['missing']} not made yet" if report["missing"] else ""
    typer.echo(f"bank {bank_dir}: ok ({report['entries']} of {planned} entries, {report['failed']} failed{more})")


@app.command()
def show(
    bank_dir: Path = typer.Argument(..., help="Bank folder."),
    category: str = typer.Option(..., help="Category name."),
    output: Path = typer.Option(..., "-o", "--output", help="PNG file to write."),
    tile: int = typer.Option(128, min=16, help="Tile size in pixels."),
):
    """Write a contact sheet of one category's images."""
    from bank.show import contact_sheet

    report = contact_sheet(bank_dir, category, output, tile)
    typer.echo(f"{report['out']}: {report['images']} images of {report['category']!r} ({report['failed']} failed)")


def _weights(value: str) -> str | None:
    return None if value.lower() in ("none", "random") else value
