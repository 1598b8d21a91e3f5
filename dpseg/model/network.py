"""DPSeg: image tower + dual-prompt cost volume + cost-volume-guided decoder.

    model = build_dpseg(DPSegConfig(encoder="convnext-b"), weights=None)
    features = model.encode_image(images)            # reusable by pass II
    logits = model(text=T, visual=V, features=features)   # (B, N, H/4, W/4)
"""

from __future__ import annotations

import os

import torch
from torch import nn

from dpseg.clip import ClipTowers, ImageFeatures, load_clip
from dpseg.clip.templates import templates as first_templates
from dpseg.errors import UserError
from dpseg.model.blocks import AttentionSummary
from dpseg.model.config import DPSegConfig
from dpseg.model.cost_volume import initial_cost
from dpseg.model.decoder import CostDecoder, DecoderInputs
from dpseg.model.prompts import VisualPrompts


class DPSeg(nn.Module):
    def __init__(self, towers: ClipTowers, cfg: DPSegConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder_spec = towers.spec
        self.weights = towers.weights
        self.image_encoder = towers.image  # fine-tuned with cfg.image_lr_multiplier
        self.prompt_encoder = towers.prompt  # frozen copy: generated images and pass-II crops
        self.text_encoder = towers.text  # frozen
        encoder_channels = dict(zip(self.image_encoder.strides, self.image_encoder.channels))
        cost_channels = cfg.templates * (2 if cfg.fusion == "concat-costs" else 1)
        self.decoder = CostDecoder(cfg, encoder_channels, cost_channels)

    # ---- prompts -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, class_names: list[str]) -> torch.Tensor:
        """(N, M, D) text prompts from the frozen text tower (cached per class name)."""
        return self.text_encoder.encode_classes(class_names, first_templates(self.cfg.templates))

    @torch.no_grad()
    def encode_prompt_images(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """RGB [0, 1] prompt images (K, 3, H, W) -> global (K, D) and pooled {stride: (K, C_l)}."""
        tower = self.prompt_encoder
        out = tower.encode_prompts(tower.normalize(tower.resize(images)), self.cfg.guidance_strides)
        return out.embedding, out.pooled

    # ---- image ---------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """CLIP-normalised images (B, 3, H, W), H and W multiples of 32."""
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise UserError(f"image size {tuple(images.shape[-2:])} must be a multiple of 32 (the encoder's stride)")
        return self.image_encoder(images)

    # ---- decoding ------------------------------------------------------------------------
    def forward(self, images: torch.Tensor | None = None, text: torch.Tensor | None = None,
                visual: VisualPrompts | None = None, features: ImageFeatures | None = None,
                class_chunk: int | None = None) -> torch.Tensor:
        """Per-class logits (B, N, H/4, W/4). Pass `features` (from `encode_image`) to skip the
        image tower; `class_chunk` (or cfg.class_chunk) decodes classes in chunks with the
        same result as one pass, in bounded memory."""
        # 1. image features: computed once, reused across chunks and by pass II
        if features is None:
            if images is None:
                raise ValueError("give images or precomputed features")
            features = self.encode_image(images)
        # 2. prompts
        num_classes = self._check_prompts(text, visual)
        # 3. decode at once, or chunk by chunk against all classes' attention summaries
        chunk = class_chunk or self.cfg.class_chunk
        if not chunk or chunk >= num_classes:
            return self.decoder(self._inputs(features, text, visual, slice(None)))
        chunks = [slice(i, min(i + chunk, num_classes)) for i in range(0, num_classes, chunk)]
        summaries: list[AttentionSummary] = []
        for stage in range(self.decoder.num_stages):
            parts = [self.decoder(self._inputs(features, text, visual, c), summaries, stage) for c in chunks]
            summaries.append(tuple(sum(p[i] for p in parts) for i in range(2)))
        return torch.cat([self.decoder(self._inputs(features, text, visual, c), summaries) for c in chunks], dim=1)

    def _check_prompts(self, text: torch.Tensor | None, visual: VisualPrompts | None) -> int:
        cfg = self.cfg
        if cfg.uses_text and text is None:
            raise UserError(f"prompt_mode {cfg.prompt_mode!r} needs text prompts")
        if cfg.uses_visual and visual is None:
            raise UserError(
                f"prompt_mode {cfg.prompt_mode!r} with visual_guidance {cfg.visual_guidance!r} needs visual prompts"
            )
        shapes = {}
        if cfg.uses_text:
            shapes["text"] = tuple(text.shape[-3:-1])
        if cfg.uses_visual:
            shapes["visual"] = (visual.num_classes, visual.num_templates)
            missing = [s for s in cfg.guidance_strides if s not in visual.pooled] if cfg.visual_guidance == "prompt" else []
            if missing:
                raise UserError(f"visual prompts lack pooled features at strides {missing}")
        for name, (n, m) in shapes.items():
            if m != cfg.templates:
                raise UserError(f"{name} prompts have {m} templates; the model was built for {cfg.templates}")
        counts = {n for n, _ in shapes.values()}
        if len(counts) != 1:
            raise UserError(f"text and visual prompts disagree on the number of classes: {shapes}")
        return counts.pop()

    def _inputs(self, features: ImageFeatures, text, visual: VisualPrompts | None, classes: slice) -> DecoderInputs:
        cfg = self.cfg
        text_c = text[..., classes, :, :] if text is not None and cfg.uses_text else None
        visual_c = visual.select(classes) if visual is not None and cfg.uses_visual else None
        cost = initial_cost(features.dense, text_c,
                            visual_c.embedding if visual_c is not None else None, cfg.prompt_mode, cfg.fusion)
        guidance = visual_c.pooled if cfg.visual_guidance == "prompt" else None
        return DecoderInputs(cost=cost, levels=features.levels, guidance_prompts=guidance)

    # ---- training ------------------------------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: decoder at `lr`, image tower at lr x image_lr_multiplier; the text and
        prompt towers are frozen and not in any group."""
        image = [p for p in self.image_encoder.parameters() if p.requires_grad]
        decoder = [p for p in self.decoder.parameters() if p.requires_grad]
        return [
            {"name": "decoder", "params": decoder, "lr": lr, "weight_decay": weight_decay},
            {"name": "image_encoder", "params": image, "lr": lr * self.cfg.image_lr_multiplier,
             "weight_decay": weight_decay},
        ]

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"params_trainable": trainable, "params_frozen": frozen,
                "params_decoder": sum(p.numel() for p in self.decoder.parameters()),
                "params_image_encoder": sum(p.numel() for p in self.image_encoder.parameters())}


def build_dpseg(cfg: DPSegConfig | None = None, weights: str | os.PathLike | None = "default",
                device: str | torch.device = "cpu") -> DPSeg:
    """The network for `cfg.encoder`; `weights=None` gives random init (no download)."""
    cfg = cfg or DPSegConfig()
    towers = load_clip(cfg.encoder, weights=weights, device=device)
    return DPSeg(towers, cfg).to(device)
