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
        {s: torch.randn(*lead, num_classes, m, tower.channels_at(s), device=device, dtype=dtype)
         for s in cfg.guidance_strides},
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
                if shape[0] == batch * num_classes and name in ("cost_embed", "head"):
                    shape = [batch, num_classes, *shape[1:]]
                shapes[name] = shape
        return hook

    decoder = model.decoder
    watched = {"cost_embed": decoder.cost_embed, "head": decoder.head}
    for k in range(decoder.num_stages):
        watched[f"stage{k}.aggregate"] = decoder.blocks[k]
        watched[f"stage{k}.skip"] = decoder.skips[k]
        watched[f"stage{k}.out"] = decoder.fusions[k]
    handles = [module.register_forward_hook(record(name)) for name, module in watched.items()]
    images = torch.empty(batch, 3, size, size, device="meta")
    text, visual = random_prompts(model, num_classes, device="meta")
    with torch.no_grad():
        features = model.encode_image(images)
        logits = model(text=text, visual=visual, features=features)
    for h in handles:
        h.remove()

    tower = model.image_encoder
    encoder_shapes = {f"encoder.stride{s}": list(f.shape) for s, f in features.levels.items()}
    encoder_shapes["encoder.dense"] = list(features.dense.shape)
    cost_channels = cfg.templates * (2 if cfg.fusion == "concat-costs" else 1)
    ordered = ["cost_embed"] + [f"stage{k}.{p}" for k in range(decoder.num_stages) for p in ("aggregate", "skip", "out")] + ["head"]
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
        "skip_channels": [tower.channels_at(s) // cfg.skip_reduction for s in cfg.guidance_strides],
        "logits_shape": list(logits.shape),
        **model.parameter_counts(),
        "shapes": {**encoder_shapes, **{k: shapes[k] for k in ordered}},
        "config": cfg.to_dict(),
    }
