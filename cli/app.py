"""`dpseg app` (a local web page: your image, your classes, pass I beside pass II) and
`dpseg bench app`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

DEMO_CHECKPOINT = Path("out/train/checkpoint")


def _checkpoint(path: Path) -> Path:
    from dpseg.errors import UserError

    if not (path / "config.json").is_file():
        hint = " (the demo's: run `bash scripts/quickstart.sh demo` first)" if path == DEMO_CHECKPOINT else ""
        raise UserError(f"no checkpoint at {path}{hint}; pass --checkpoint DIR")
    return path


def app_command(
    checkpoint: Path = typer.Option(DEMO_CHECKPOINT, help="Checkpoint folder (default: the demo's)."),
    bank: Path | None = typer.Option(None, help="Bank folder (default: the one the checkpoint was trained with)."),
    encoder_weights: str | None = typer.Option(
        None, help="Encoder weights the checkpoint was trained with (default: carried in it, or recorded)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to serve on; 0.0.0.0 opens it to the network."),
    port: int = typer.Option(7860, min=1, max=65535),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    size: int | None = typer.Option(None, help="Model input size (default: the checkpoint's)."),
    examples: Path | None = typer.Option(
        None, help="Prepared dataset whose first val images are the page's examples (default: the checkpoint's)."
    ),
    generate: bool = typer.Option(False, "--generate", help="Generate prompt images for classes the bank lacks."),
    max_classes: int = typer.Option(1000, min=1, help="Most classes one Run takes."),
    max_side: int = typer.Option(2048, min=64, help="Uploads with a longer side are resized to this."),
    max_upload: str = typer.Option("20mb", help="Largest upload the server accepts."),
    class_chunk: int | None = typer.Option(None, min=1, help="Decode this many classes at a time (bounded memory)."),
):
    """A local web page: upload an image, type classes, see pass I beside pass II, the bank's
    prompt images beside the crops that replaced them, and cost maps. Models load once."""
    from pipeline.app.page import dataset_examples, examples_folder, import_gradio, serve
    from pipeline.app.runner import AppRunner
    from pipeline.evaluate.session import SegmentSession

    import_gradio()  # a missing extra fails before the model loads
    session = SegmentSession(_checkpoint(checkpoint), bank, device, size, class_chunk, encoder_weights)
    runner = AppRunner(session, max_classes=max_classes, max_side=max_side, generate=generate)
    found = dataset_examples(session, examples_folder(), dataset=str(examples) if examples else None)
    typer.echo(
        f"dpseg app: {checkpoint} ({session.cfg.prompt_mode} prompts, {session.size} px, {session.device}); "
        f"bank {session.bank_dir}; {len(found)} examples; http://{host}:{port} (Ctrl+C stops it)"
    )
    serve(runner, host=host, port=port, max_upload=max_upload, examples=found, block=True)


def bench_app_command(
    checkpoint: Path = typer.Option(DEMO_CHECKPOINT, help="Checkpoint folder (default: the demo's)."),
    bank: Path | None = typer.Option(None, help="Bank folder (default: the checkpoint's)."),
    classes: str | None = typer.Option(None, help="Classes (default: the checkpoint's training vocabulary)."),
    size: int = typer.Option(512, min=32, help="Side of the square test image (px)."),
    repeats: int = typer.Option(5, min=1, help="Timed runs after one warm-up run."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    out: Path | None = typer.Option(None, "-o", "--out", help="Also write the JSON here (docs/bench/...)."),
):
    """Time from the page's Run to both overlays (pass I and pass II) for one image, after start-up."""
    from dpseg.io import atomic_write_json
    from pipeline.app.bench import bench_app

    result = bench_app(str(_checkpoint(checkpoint)), str(bank) if bank else None, classes, size, repeats, device)
    if out:
        atomic_write_json(out, result)
    typer.echo(json.dumps(result, indent=2))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("app")(app_command)
    bench_app.command("app")(bench_app_command)
