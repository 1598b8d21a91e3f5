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
    class_chunk: int = typer.Option(0, help="Decode classes in chunks of this size (0: one pass)."),
    out: Path = typer.Option(None, "-o", "--out", help="Also write the JSON here."),
):
    """Forward latency and peak memory: whole network vs image tower alone."""
    from pipeline.bench_model import bench_model

    result = bench_model(encoder, size or None, _ints(classes), _ints(batch), dtype, device, warmup, repeats,
                         class_chunk or None)
    text = json.dumps(result, indent=2)
    if out:
        atomic_write_json(out, result)
    typer.echo(text)
