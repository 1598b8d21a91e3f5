"""`dpseg analyze heatmap`: per-pixel cost maps of one image for a few classes (paper Fig. 3),
and with a trained checkpoint the multi-scale visual cost volumes per decoder stage (Fig. 8).

Definitions (docs/analyses.md):
- the image is resized to the model input size (square, the encoder's or the checkpoint's),
  CLIP-normalised, and encoded by the image tower (the frozen CLIP tower; with a checkpoint,
  its fine-tuned one) into the dense stride-32 embedding F (the head at every location);
- cost(prompt kind) = mean over the M templates of cos(F(x, y), P[n, m]) with P the text
  prompts, the bank's visual prompts, or the dual prompts of Eq. 1, then upsampled bilinearly
  to the image's own size: values in [-1, 1];
- stage costs (Fig. 8) = mean over templates of Eq. 2, cos(F_l(x, y), P_l[n, m]), at each
  decoder stage's stride l (16, 8, 4), beside the stride-32 visual cost upsampled bilinearly
  (what the "upsampled cost" ablation feeds the decoder instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dpseg.data.vocab import parse_classes
from dpseg.errors import UserError

KINDS = ("text", "visual", "dual")


# ---- the maps: pure tensor functions ---------------------------------------------------------
def template_mean_cost(features: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """features (1, C, h, w), prompts (N, M, C) -> (N, h, w): mean over m of cos(F, P[n, m])."""
    from dpseg.model.cost_volume import cosine_cost

    return cosine_cost(features.float(), prompts.float()).mean(dim=1)[0]


def prompt_costs(dense: torch.Tensor, text: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three Fig. 3 maps at stride 32: {kind: (N, h, w)}."""
    from dpseg.model.cost_volume import dual_prompt_embeddings

    return {
        "text": template_mean_cost(dense, text),
        "visual": template_mean_cost(dense, visual),
        "dual": template_mean_cost(dense, dual_prompt_embeddings(text.float(), visual.float())),
    }


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W) bilinear; bilinear weights sum to one, so values stay in [min, max]."""
    return F.interpolate(maps.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]


# ---- the run ---------------------------------------------------------------------------------
def load_image(path: str | Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"cannot read image {path} ({err.__class__.__name__}); give a JPEG or PNG photo") from None


def run_heatmap(
    image_path: str | Path,
    classes: str,
    bank_dir: str | Path,
    encoder: str | None,
    out: str | Path,
    encoder_weights: str | None = None,
    checkpoint: str | Path | None = None,
    size: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    from bank.reader import Bank
    from dpseg.clip.templates import templates as first_templates
    from pipeline.analyze import plots
    from pipeline.analyze.gap import load_towers

    # 1. inputs: image, class names, bank (encoder, weights, templates), towers or checkpoint
    out = plots.check_output(out)
    image = load_image(image_path)
    names = parse_classes(classes)
    bank = Bank(bank_dir)
    model = None
    if checkpoint is not None:
        from dpseg.model.checkpoint import load_dpseg, read_checkpoint_config

        config = read_checkpoint_config(checkpoint)
        ckpt_encoder = config["model"]["encoder"]
        if encoder not in (None, ckpt_encoder):
            raise UserError(
                f"checkpoint {checkpoint} was trained with encoder {ckpt_encoder!r}, not {encoder!r}; "
                f"omit --encoder or pass {ckpt_encoder}"
            )
        encoder = ckpt_encoder
        model = load_dpseg(checkpoint, device).eval()
        templates = int(model.cfg.templates)
        image_tower, text_tower = model.image_encoder, model.text_encoder
        extra = config.get("extra", {})
        size = size or int(extra.get("recipe", {}).get("crop_size") or model.encoder_spec.image_size)  # as trained
        encode_size = extra.get("encode_size")
    if encoder is None:
        raise UserError("give --encoder (one of the bank's: " + (", ".join(bank.encoders()) or "none") + ")")
    info = bank.encoder_info(encoder)
    if model is None:
        encode_size = None
        templates = int(bank.config["templates"])
        towers = load_towers(encoder, info, encoder_weights, device)
        image_tower, text_tower = towers.image.freeze(), towers.text
        size = size or towers.spec.image_size
    if size % 32:
        raise UserError(f"--size {size} must be a multiple of 32 (the encoder's stride)")
    # 2. prompts: text (templates as the bank / checkpoint), the bank's visual prompts
    encode_size = int(encode_size or bank.encode_size(encoder))  # the checkpoint's, else the bank's own
    protos = bank.prototypes(names, encoder, templates, device=device, encode_size=encode_size)
    text = text_tower.encode_classes(names, first_templates(templates)).float().to(device)
    # 3. the image's dense embedding and multi-scale features at the model input size
    pixels = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float().div(255).to(device)
    with torch.no_grad():
        features = image_tower(image_tower.normalize(image_tower.resize(pixels, size)))
        coarse = prompt_costs(features.dense, text, protos.embedding)
    full = image.shape[:2]
    maps = torch.stack([upsample(coarse[k], full) for k in KINDS], dim=1)  # (N, 3, H, W)
    # 4. Fig. 3: rows = classes, columns = image | text | visual | dual
    data = {
        "image": str(image_path),
        "classes": names,
        "kinds": list(KINDS),
        "size": size,
        "templates": templates,
        "encode_size": encode_size,
        "encoder": encoder,
        "bank": str(bank.root),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "definition": "mean over templates of cos(dense stride-32 embedding, prompt), upsampled bilinearly",
        "range": {k: [float(coarse[k].min()), float(coarse[k].max())] for k in KINDS},
        "image_size": list(full),
        "shape": list(maps.shape),
        "stride32": {k: coarse[k] for k in KINDS},
    }
    fig = plots.heatmap_grid(image, names, list(KINDS), maps.cpu().numpy(), "prompt cost maps (Fig. 3)")
    files = {"prompts": plots.save_figure(fig, out, data)}
    result = {
        "classes": names,
        "size": size,
        "image_size": list(full),
        "shape": list(maps.shape),
        "range": data["range"],
        "files": files,
    }
    # 5. Fig. 8: with a checkpoint, Eq. 2 per decoder stage beside the upsampled stride-32 cost
    if model is not None:
        result["stages"] = stage_figure(
            model, features, protos, coarse["visual"], image, names, out.with_name(out.stem + "-stages" + out.suffix)
        )
    return result


def stage_costs(features, pooled: dict[int, torch.Tensor], strides) -> dict[int, torch.Tensor]:
    """Eq. 2 averaged over templates at each stride: {stride: (N, H_l, W_l)}."""
    return {s: template_mean_cost(features.levels[s], pooled[s]) for s in strides}


def stage_figure(
    model, features, protos, visual32: torch.Tensor, image: np.ndarray, names: list[str], path: Path
) -> dict[str, Any]:
    from pipeline.analyze import plots

    strides = list(model.cfg.guidance_strides)
    with torch.no_grad():
        costs = stage_costs(features, {s: protos.pooled[s].to(features.levels[s].device) for s in strides}, strides)
    full = image.shape[:2]
    columns = [f"stride {s} (Eq. 2)" for s in strides] + ["stride 32, upsampled"]
    panels = [upsample(costs[s], full) for s in strides] + [upsample(visual32, full)]
    maps = torch.stack(panels, dim=1).cpu().numpy()  # (N, stages + 1, H, W)
    data = {
        "classes": names,
        "strides": strides,
        "columns": columns,
        "definition": "mean over templates of cos(stage features, pooled visual prompt) (Eq. 2); beside them the "
        "stride-32 visual cost upsampled bilinearly",
        "range": {str(s): [float(costs[s].min()), float(costs[s].max())] for s in strides},
        "maps": {str(s): costs[s] for s in strides},
    }
    fig = plots.heatmap_grid(
        image, names, columns, maps, "visual cost volumes per decoder stage (Fig. 8)", shared_row_scale=False
    )
    return {**plots.save_figure(fig, path, data), "shape": list(maps.shape), "range": data["range"]}
