"""`dpseg model ...`: inspect the network."""

from __future__ import annotations

import json

import typer

app = typer.Typer(help="Inspect the DPSeg network.", no_args_is_help=True)


@app.command()
def summary(
    encoder: str = typer.Option("convnext-b", help="Registered encoder: convnext-b, convnext-l, tiny."),
    classes: int = typer.Option(171, min=1, help="Number of categories."),
    size: int = typer.Option(768, min=32, help="Input size (multiple of 32)."),
    templates: int = typer.Option(80, min=1, max=80, help="Prompt templates (cost-volume channels)."),
    prompt_mode: str = typer.Option("dual", help="text | visual | dual"),
    fusion: str = typer.Option("avg-embeddings", help="avg-embeddings | concat-costs | avg-costs"),
    visual_guidance: str = typer.Option("prompt", help="prompt | upsampled-cost | none"),
    deep_supervision: bool = typer.Option(True, help="SED's aux heads at strides 32/16/8."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Build the network (random init, no download) and show its structure and shapes."""
    from dpseg.model import DPSegConfig
    from dpseg.model.summary import model_summary

    cfg = DPSegConfig(
        encoder=encoder,
        templates=templates,
        prompt_mode=prompt_mode,
        fusion=fusion,
        visual_guidance=visual_guidance,
        deep_supervision=deep_supervision,
    )
    info = model_summary(cfg, classes, size)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"DPSeg  encoder={info['encoder']} ({info['open_clip_model']})  classes={classes}  size={size}")
    for key in (
        "embed_dim",
        "stage_channels",
        "strides",
        "templates",
        "cost_volume_shape",
        "decoder_dims",
        "skip_channels",
        "params_trainable",
        "params_frozen",
        "params_decoder",
    ):
        typer.echo(f"  {key:<18} {info[key]}")
    typer.echo("  shapes:")
    for name, shape in info["shapes"].items():
        typer.echo(f"    {name:<18} {shape}")
    typer.echo("  aux heads (3x3 conv -> 1 logit per class, on detached states):")
    for h in info["aux_heads"] or [{"stage": "-", "stride": "-", "in_channels": "none (deep supervision off)"}]:
        typer.echo(f"    stage {h['stage']}  stride {h['stride']}  in {h['in_channels']}")
    typer.echo("  fusion blocks (deconv, concat skip + guidance, 2x [3x3 conv, GroupNorm, ReLU]):")
    for f in info["fusion_blocks"]:
        typer.echo(
            f"    stage {f['stage']}  stride {f['stride']}  {f['in_channels']} -> deconv {f['deconv_channels']}"
            f" + skip {f['skip_channels']} + guidance {f['guidance_channels']} -> {f['out_channels']}"
            f"  (GroupNorm {f['groupnorm_groups']} groups)"
        )
