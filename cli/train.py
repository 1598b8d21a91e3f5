"""`dpseg train` (stage two) and `dpseg bench train`. Every TrainSettings field is a flag named
after it (`--batch-size`, `--prompt-mode`, ...), generated from the dataclass so the two never
drift apart."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path

import typer

HELP = {
    "dataset": "Prepared dataset folder (dpseg data prepare / dpseg data synth).",
    "bank": "Visual-prompt bank folder (not needed for --prompt-mode text --visual-guidance upsampled-cost).",
    "out": "Run folder: checkpoint/, metrics.jsonl, loss.csv, train.json.",
    "encoder": "Registered encoder (default: the bank's).",
    "encoder_weights": "Encoder weights: a .safetensors file, an open_clip tag, or 'none' (default: the bank's).",
    "classes": "Class subset trained on: 'all', a declared subset ('seen'), or ids '0,3,7'.",
    "templates": "Templates per class (default: the bank's).",
    "encode_size": "Prompt encode size the bank must hold (default: whatever it holds).",
    "prompt_mode": "text | visual | dual (paper Table 2a).",
    "fusion": "avg-embeddings | concat-costs | avg-costs (paper Table 2b).",
    "visual_guidance": "prompt | upsampled-cost | none (paper Table 3).",
    "deep_supervision": "SED's aux heads with a BCE each.",
    "model_overrides": "JSON object of other model config fields, e.g. '{\"decoder_dims\": [32, 16, 8]}'.",
    "steps": "Optimizer steps (paper: 80k).",
    "batch_size": "Global batch per optimizer step, over ranks and accumulation (paper: 4).",
    "crop_size": "Training crop, a multiple of 32 (paper: 768).",
    "lr": "AdamW learning rate (paper: 2e-4).",
    "weight_decay": "AdamW weight decay; 0 on norms and biases (SED: 1e-4).",
    "image_lr_multiplier": "Image-tower lr = lr x this (SED: 0.01).",
    "grad_clip": "Full-model gradient-norm clip (SED: 0.01); 0 = off.",
    "grad_accum": "Micro-steps per optimizer step (the global batch stays --batch-size).",
    "color_jitter": "SED's photometric distortion.",
    "crop_prompts": "Share of each present class's M bank prompts replaced by its ground-truth crop (0: off; "
    "not in the paper).",
    "crop_negatives": "With --crop-prompts: absent classes per image given a present class's crop, as pass II's "
    "false detections are (0: off; not in the paper).",
    "crop_negative_classes": "With --crop-negatives: random (any absent class) | similar (one of the absent "
    "classes whose bank prompts are nearest the crop's class, as pass I confuses them; not in the paper).",
    "crop_prompt_images": "With --crop-prompts: the share of training images given crops; the rest keep the bank's "
    "prompts, as pass I does.",
    "crop_present_share": "With --crop-prompts: the share of present classes given their crop (drawn per class); "
    "the rest keep the bank's prompts, as the classes pass I misses do (1: all; not in the paper).",
    "crop_prompts_from": "With --crop-prompts: the share of the steps trained on bank prompts alone before crop "
    "prompts begin (0: from the first step; not in the paper).",
    "crop_source": "With --crop-prompts: truth (crops cut from the label map) | prediction (from the decoder's own "
    "current prediction, as pass II cuts them from pass I's; not in the paper).",
    "mixed_precision": "fp32 (SED's; 'no' is the same) | bf16 | fp16 | auto (bf16 or fp16 on GPU, fp32 on CPU).",
    "seed": "Seed of the decoder init, the data order and the augmentations.",
    "num_workers": "Data-loader worker processes.",
    "log_every": "Steps between metrics.jsonl lines.",
    "checkpoint_every": "Steps between checkpoints (0: only at the end).",
    "val_every": "Steps between validation pAcc/mIoU lines (0: none).",
    "val_images": "Images of the validation split used.",
    "val_split": "Validation split.",
    "resume": "auto (continue OUT's checkpoint if any) | yes (must) | no (start over).",
}


def _recipe_parameters() -> list[inspect.Parameter]:
    from pipeline.train.loop import TrainSettings

    params = []
    defaults = TrainSettings()
    for f in dataclasses.fields(TrainSettings):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "model_overrides":
            annotation, option = str | None, typer.Option(None, flag, help=HELP[f.name])
        elif isinstance(default, bool):
            annotation, option = bool, typer.Option(default, f"{flag}/--no-{flag[2:]}", help=HELP[f.name])
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            annotation = kind | None if default is None else kind
            option = typer.Option(default, flag, help=HELP[f.name])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def _recipe_from(kwargs: dict):
    from dpseg.errors import UserError
    from pipeline.train.loop import TrainSettings

    overrides = kwargs.pop("model_overrides", None)
    if overrides:
        try:
            parsed = json.loads(overrides)
        except json.JSONDecodeError as err:
            raise UserError(
                f"--model-overrides is not a JSON object ({err.msg}); e.g. '{{\"cost_dim\": 64}}'"
            ) from None
        if not isinstance(parsed, dict):
            raise UserError("--model-overrides must be a JSON object, e.g. '{\"cost_dim\": 64}'")
        kwargs["model_overrides"] = parsed
    return TrainSettings(**kwargs)


def train_command(**kwargs):
    """Stage two: train DPSeg from a prepared dataset and a prompt bank (resumes OUT's checkpoint)."""
    from pipeline.train.loop import train

    as_json, progress = kwargs.pop("json_output"), kwargs.pop("progress")
    summary = train(_recipe_from(kwargs), progress=progress)
    if os.environ.get("RANK", "0") != "0":  # under `accelerate launch` the main rank reports
        return
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        val = summary.get("validation")
        typer.echo(
            f"trained {summary['steps']} steps ({summary['resumed_from']} resumed) in {summary['seconds']} s; "
            f"final loss {summary['final_loss']}; checkpoint {summary['checkpoint']}"
            + (f"; val pAcc {val['val_pacc']:.3f} mIoU {val['val_miou']:.3f}" if val else "")
        )


train_command.__signature__ = inspect.Signature(
    _recipe_parameters()
    + [
        inspect.Parameter(
            "json_output",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(False, "--json", help="Print the train.json summary."),
        ),
        inspect.Parameter(
            "progress",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(True, "--progress/--no-progress", help="Progress bar."),
        ),
    ]
)


def bench_train_command(
    encoder: str = typer.Option("tiny", help="Registered encoder."),
    size: int = typer.Option(64, help="Crop size (multiple of 32)."),
    classes: int = typer.Option(36, help="Classes (prompts) per step."),
    templates: int = typer.Option(4, help="Templates per class."),
    batch_size: int = typer.Option(4, help="Batch per step."),
    steps: int = typer.Option(20, min=2, help="Timed steps per case (after warm-up)."),
    rounds: int = typer.Option(2, min=1, help="Alternations of the cases; the fastest of each is kept."),
    num_workers: int = typer.Option(1, min=0, help="Loader workers for the real-loader case."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    mixed_precision: str = typer.Option("fp32", help="Precision of the three cases: fp32 | bf16 | fp16 | auto."),
    precisions: str = typer.Option(
        "all", help="Precisions compared on the in-memory step: all (CPU: fp32,bf16; GPU: +fp16) or a list."
    ),
    data: Path | None = typer.Option(None, help="Prepared dataset to read (default: a shapes set made in a temp dir)."),
    out: Path | None = typer.Option(None, "-o", "--out", help="Also write the JSON here."),
):
    """Train-step time: real loader + bank vs in-memory tensors, dual vs text-only prompts; peak memory."""
    from dpseg.io import atomic_write_json
    from pipeline.bench.train import bench_train

    result = bench_train(
        encoder=encoder,
        size=size,
        classes=classes,
        templates=templates,
        batch_size=batch_size,
        steps=steps,
        rounds=rounds,
        num_workers=num_workers,
        device=device,
        mixed_precision=mixed_precision,
        data=data,
        precisions=precisions,
    )
    if out:
        atomic_write_json(out, result)
    typer.echo(json.dumps(result, indent=2))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Adds `dpseg train` to the root app and `dpseg bench train` to the benchmarks."""
    app.command("train")(train_command)
    bench_app.command("train")(bench_train_command)
