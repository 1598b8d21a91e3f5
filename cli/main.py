"""`dpseg` entry point: nested command groups, one module each."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from cli import analyze, bank, bench, clip, data, evaluate, model, train
from cli import app as app_command
from cli.errors import UserErrorGroup

app = typer.Typer(
    name="dpseg",
    cls=UserErrorGroup,
    help="DPSeg: open-vocabulary segmentation with text + visual prompts (bank, train, eval).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(model.app, name="model")
app.add_typer(bank.app, name="bank")
app.add_typer(data.app, name="data")
app.add_typer(bench.app, name="bench")
# stage commands (`dpseg train`, `dpseg eval`, `dpseg segment`, `dpseg report`, `dpseg clip ...`,
# `dpseg analyze ...`, `dpseg app`) and their benchmarks (`dpseg bench train|eval|app`) register themselves
for _module in (train, evaluate, clip, analyze, app_command):
    _module.register(app, bench.app)


@app.command()
def smoke(
    size: int = typer.Option(128, help="Input size (multiple of 32)."),
    bank: Path = typer.Option(None, help="A bank to take visual prompts from (the demo bank: out/bank)."),
):
    """Smoke check: the untrained network segments one synthetic scene with bank prompts (the main
    job, training and evaluation included, is `dvc repro`: README quick start)."""
    from pipeline.smoke import run_smoke

    result = run_smoke(size=size, bank_dir=bank)
    s = result["summary"]
    typer.echo(
        f"encoder {s['encoder']}: embed_dim={s['embed_dim']} stage_channels={s['stage_channels']} "
        f"strides={s['strides']} templates={s['templates']}"
    )
    typer.echo(
        f"cost volume {s['cost_volume_shape']}  decoder dims {s['decoder_dims']}  "
        f"params trainable={s['params_trainable']:,} frozen={s['params_frozen']:,}"
    )
    for name, shape in s["shapes"].items():
        typer.echo(f"  {name:<18} {shape}")
    typer.echo(f"prompts: {result['prompts']}, {result['classes']} classes")
    typer.echo(
        f"forward: logits {result['logits_shape']} in {result['forward_ms']} ms; pixel accuracy "
        f"{result['pixel_accuracy']} (untrained network: chance is {result['chance']})"
    )


def main() -> None:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "initialized randomly" etc.
    app()


if __name__ == "__main__":
    main()
