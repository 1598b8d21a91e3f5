"""`dpseg` entry point: nested command groups, one module each."""

from __future__ import annotations

import logging
import os

import typer

from cli import bank, bench, data, model
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


def main() -> None:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "initialized randomly" etc.
    app()


if __name__ == "__main__":
    main()
