"""`dpseg model summary`: build the network (random init, on the meta device: no memory, no
download) and report its structure and the tensor shape after every stage."""

from __future__ import annotations

import torch

from dpseg.model import DPSegConfig, VisualPrompts, build_dpseg


def random_prompts(model, num_classes: int, device="cpu", dtype=torch.float32, batch: int | None = None):
    """Text and visual prompt tensors of the right shapes (for summaries and benchmarks)."""
    cfg, tower = model.cfg, model.image_encoder
    lead = (batch,) if batch else ()
    m = cfg.templates
    text = torch.randn(*lead, num_classes, m, tower.embed_dim, device=device, dtype=dtype)
    visual = VisualPrompts(
        torch.randn(*lead, num_classes, m, tower.embed_dim, device=device, dtype=dtype),
        {
            s: torch.randn(*lead, num_classes, m, tower.channels_at(s), device=device, dtype=dtype)
            for s in cfg.guidance_strides
        },
    )
    return text, visual


def model_summary(cfg: DPSegConfig, num_classes: int, size: int, batch: int = 1) -> dict:
    with torch.device("meta"):
        model = build_dpseg(cfg, weights=None, device="meta")
    model.eval()
    shapes: dict[str, list[int]] = {}

    def record(name: str):
        def hook(_module, _inputs, output):
            if torch.is_tensor(output):
                shape = list(output.shape)
                if shape[0] == batch * num_classes and (name in ("cost_embed", "head") or name.endswith(".aux")):
                    shape = [batch, num_classes, *shape[1:]]
                shapes[name] = shape

        return hook

    decoder = model.decoder
    watched = {"cost_embed": decoder.cost_embed, "head": decoder.head}
    for k in range(decoder.num_stages):
        if decoder.aux_heads is not None:
            watched[f"stage{k}.aux"] = decoder.aux_heads[k]
        watched[f"stage{k}.aggregate"] = decoder.blocks[k]
        watched[f"stage{k}.skip"] = decoder.skips[k]
        watched[f"stage{k}.out"] = decoder.fusions[k]
    handles = [module.register_forward_hook(record(name)) for name, module in watched.items()]
    images = torch.empty(batch, 3, size, size, device="meta")
    text, visual = random_prompts(model, num_classes, device="meta")
    with torch.no_grad():
        features = model.encode_image(images)
        logits, _ = model(text=text, visual=visual, features=features, aux=True)
    for h in handles:
        h.remove()

    tower = model.image_encoder
    encoder_shapes = {f"encoder.stride{s}": list(f.shape) for s, f in features.levels.items()}
    encoder_shapes["encoder.dense"] = list(features.dense.shape)
    cost_channels = cfg.cost_channels
    parts = ("aux", "aggregate", "skip", "out") if decoder.aux_heads is not None else ("aggregate", "skip", "out")
    ordered = ["cost_embed"] + [f"stage{k}.{p}" for k in range(decoder.num_stages) for p in parts] + ["head"]
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    in_dims = [cfg.cost_dim, *cfg.decoder_dims[:-1]]
    aux_heads = (
        [
            {
                "stage": k,
                "stride": size // shapes[f"stage{k}.aux"][-1],
                "in_channels": in_dims[k],
                "shape": shapes[f"stage{k}.aux"],
                "params": n_params(decoder.aux_heads[k]),
            }
            for k in range(decoder.num_stages)
        ]
        if decoder.aux_heads is not None
        else []
    )
    fusion_blocks = []
    for k, fusion in enumerate(decoder.fusions):
        fusion_blocks.append(
            {
                "stage": k,
                "stride": cfg.guidance_strides[k],
                "in_channels": in_dims[k],
                "deconv_channels": fusion.up.out_channels,
                "skip_channels": fusion.from_skip.in_channels,
                "guidance_channels": fusion.from_guidance.in_channels if fusion.from_guidance is not None else 0,
                "out_channels": fusion.conv2.out_channels,
                "groupnorm_groups": fusion.norm1.num_groups,
                "params": n_params(fusion),
            }
        )
    return {
        "encoder": cfg.encoder,
        "open_clip_model": model.encoder_spec.open_clip_model,
        "pretrained_tag": model.encoder_spec.pretrained_tag,
        "embed_dim": tower.embed_dim,
        "stage_channels": tower.channels,
        "strides": tower.strides,
        "templates": cfg.templates,
        "classes": num_classes,
        "size": size,
        "cost_volume_shape": [batch, cost_channels, num_classes, size // 32, size // 32],
        "decoder_dims": list(cfg.decoder_dims),
        "skip_channels": list(cfg.guidance_dims),
        "visual_guidance": cfg.visual_guidance,
        "guidance_stages": list(cfg.guidance_stages),
        "aux_heads": aux_heads,
        "fusion_blocks": fusion_blocks,
        "cost_chain": [list(s.weight.shape) for s in decoder.cost_chain.steps] if decoder.cost_chain else [],
        "logits_shape": list(logits.shape),
        **model.parameter_counts(),
        "shapes": {**encoder_shapes, **{k: shapes[k] for k in ordered}},
        "config": cfg.to_dict(),
    }
