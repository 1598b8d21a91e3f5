"""`dpseg bench ...`"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dpseg.io import atomic_write_json

app = typer.Typer(help="Benchmarks: JSON results, ratios taken in one run.", no_args_is_help=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@app.command("model")
def bench_model_command(
    encoder: str = typer.Option("tiny", help="Registered encoder."),
    size: int = typer.Option(0, help="Input size (0: the encoder's default, 768 for ConvNeXt)."),
    classes: str = typer.Option("150", help="Comma-separated class counts, e.g. 150,847."),
    batch: str = typer.Option("1", help="Comma-separated batch sizes, e.g. 1,8."),
    dtype: str = typer.Option("fp32", help="fp32 | fp16 | bf16"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    warmup: int = typer.Option(2, min=0),
    repeats: int = typer.Option(5, min=1),
    class_chunk: int = typer.Option(0, help="Also time the decoder in class chunks of this size (0: no)."),
    reject_topk: int = typer.Option(0, help="Also time the decoder with SED's early rejection at this top-k (0: no)."),
    threads: int = typer.Option(0, help="CPU threads for torch (0: torch's default); 1 on a busy shared machine."),
    compile_decoder: bool = typer.Option(
        False, "--compile-decoder", help="Also time the one-pass decoder under torch.compile (warm-up apart)."
    ),
    out: Path = typer.Option(None, "-o", "--out", help="Also write the JSON here."),
):
    """Forward latency and peak memory: whole network, image tower alone, decoder alone (and chunked / rejecting)."""
    from pipeline.bench.model import bench_model

    result = bench_model(
        encoder,
        size or None,
        _ints(classes),
        _ints(batch),
        dtype,
        device,
        warmup,
        repeats,
        class_chunk or None,
        reject_topk or None,
        threads or None,
        compile_decoder,
    )
    text = json.dumps(result, indent=2)
    if out:
        atomic_write_json(out, result)
    typer.echo(text)


@app.command("bank")
def bench_bank_command(
    generator: str = typer.Option(
        "tiny-sd", help="tiny-sd (CPU) or sd15-random (real SD1.5 architecture, random weights: GPU)."
    ),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    dtype: str = typer.Option("auto", help="auto (fp16 on GPU) | fp32 | fp16 | bf16"),
    resolution: int = typer.Option(0, help="Image size (0: the generator's default: tiny-sd 64, sd15-random 768)."),
    steps: int = typer.Option(
        25, min=1, help="Denoising steps (25: the bank's SD default, so the generator does its real share of work)."
    ),
    batch_sizes: str = typer.Option("4", help="Comma-separated batch sizes, e.g. 8,16."),
    batches: int = typer.Option(16, min=1, help="Batches timed per case (bare loop and bank build each)."),
    rounds: int = typer.Option(2, min=1, help="Alternations of (bare loop, bank build); the fastest of each is kept."),
    compile: str = typer.Option("", help="Also time with torch.compile of these modules: unet | unet,vae."),
    compiled_batch_sizes: str = typer.Option("", help="Batch sizes for the compiled case (default: the largest)."),
    encoder: str = typer.Option("tiny", help="Prompt encoder (convnext-b for the GPU run)."),
    encoder_weights: str = typer.Option("none", help="Encoder weights ('none': random, same cost)."),
    encode_batch_size: int = typer.Option(32, min=1, help="Re-encoding batch size (GPU: 128-512)."),
    encode_workers: int = typer.Option(-1, min=-1, help="PNG-decoding processes (-1: cores less one, at most 8)."),
    encode_only: bool = typer.Option(False, "--encode-only", help="Only re-encoding throughput (no generator)."),
    encode_sizes: str = typer.Option("", help="--encode-only: encode sizes (default: the encoder's input size)."),
    encode_images: int = typer.Option(1024, min=1, help="--encode-only: stored images re-encoded."),
    out: Path = typer.Option(None, "-o", "--out", help="Also write the JSON here."),
):
    """Bank build overhead vs the bare generator loop, encode throughput, prototype read time, dedup ratio."""
    from pipeline.bench.bank import bench_bank, bench_encode

    workers = None if encode_workers < 0 else encode_workers
    weights = None if encoder_weights.lower() in ("none", "random") else encoder_weights
    if encode_only:
        from dpseg.clip.encoders import ENCODERS

        result = bench_encode(
            encoder,
            _ints(encode_sizes) or [ENCODERS.get(encoder).image_size],
            encode_images,
            resolution or 768,
            encode_batch_size,
            workers,
            device,
            weights,
        )
        if out:
            atomic_write_json(out, result)
        typer.echo(json.dumps(result, indent=2))
        return
    result = bench_bank(
        generator,
        device,
        dtype,
        resolution or None,
        steps,
        _ints(batch_sizes),
        batches,
        tuple(c for c in compile.split(",") if c),
        _ints(compiled_batch_sizes) or None,
        encoder,
        weights,
        rounds=rounds,
        encode_batch_size=encode_batch_size,
        encode_workers=workers,
    )
    if out:
        atomic_write_json(out, result)
    typer.echo(json.dumps(result, indent=2))
