"""A loaded checkpoint that segments many images: what `dpseg segment` and `dpseg app` share.

    session = SegmentSession("out/train/checkpoint")            # loads the model and opens the bank once
    prompts = session.prompts(["cat", "dog"], kind="dual")     # text + bank prototypes, cached per class
    result = session.run(image, prompts, passes=2)             # pass I, pass II, labels at the image's size
    result.preds[1], result.preds[2], result.detected, result.refinement

Prompt kinds (what the page and the CLI call text / visual / dual):
- dual: as the checkpoint was trained (for a dual checkpoint, text and bank prompts fused);
- text: the bank is left out: every class's visual slot takes its text embedding and its pooled
  visual-guidance features are zero, as for a class the bank lacks;
- visual: the text slot takes the bank's prompt embedding, so the fused prompt is the visual one
  (classes the bank lacks keep their text prompt).
Classes the bank lacks are text-only in every kind. Pass II replaces the visual slots of every
detected class with the image's own crop, whatever the kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bank.runtime import resolve_device
from dpseg.clip.templates import primary_name
from dpseg.errors import UserError
from dpseg.metrics import predict_labels
from dpseg.model.prompts import VisualPrompts
from dpseg.refine import DEFAULT_MIN_AREA, Refinement, RefineSettings, image_crops, refine_batch, replace_prompts
from pipeline.evaluate.setup import (
    bank_encoder_info,
    load_prototypes,
    open_bank,
    pass2_merge,
    read_facts,
    tower_weights,
)

PROMPT_KINDS = ("dual", "text", "visual")


@dataclass
class Prompts:
    names: list[str]
    kind: str
    text: torch.Tensor  # (N, M, D); a checkpoint without text prompts ignores it
    visual: VisualPrompts | None  # None for a checkpoint that uses no visual prompts
    text_only: list[str]  # classes the bank lacks: text prompts only


@dataclass
class Segmentation:
    prompts: Prompts
    image: np.ndarray  # (H, W, 3) uint8, as given
    images01: torch.Tensor  # (1, 3, S, S) the model input in [0, 1]
    features: Any  # the image tower's ImageFeatures (reused by pass II and the cost maps)
    preds: dict[int, np.ndarray]  # pass -> (H, W) class indices at the image's own size
    detect_map: torch.Tensor | None = None  # (1, S, S) pass I's argmax at model-input size (pass II)
    refinement: Refinement | None = None
    refine: RefineSettings | None = None
    extra: dict = field(default_factory=dict)

    @property
    def final(self) -> np.ndarray:
        return self.preds[max(self.preds)]

    @property
    def detected(self) -> list[dict]:
        """The final pass's classes, largest first: id, pixels, share of the image."""
        final = self.final
        names = self.prompts.names
        areas = np.bincount(final.ravel(), minlength=len(names))
        return [
            {"class": names[i], "id": int(i), "pixels": int(areas[i]), "share": float(areas[i] / final.size)}
            for i in np.argsort(-areas, kind="stable")
            if areas[i] > 0
        ]


class SegmentSession:
    """The checkpoint's model, its bank and prompt caches, loaded once."""

    def __init__(
        self,
        checkpoint: str | Path,
        bank: str | Path | None = None,
        device: str = "auto",
        size: int | None = None,
        class_chunk: int | None = None,
        encoder_weights: str | None = None,
    ):
        from dpseg.model.checkpoint import load_dpseg

        self.checkpoint = str(checkpoint)
        self.device = torch.device(resolve_device(device))
        self.class_chunk = class_chunk
        config, facts = read_facts(self.checkpoint)
        if encoder_weights is not None:  # --encoder-weights: the towers are identified by these
            facts["encoder_weights"] = tower_weights(encoder_weights, facts, None)[0]
        self.facts = facts
        self.extra = config.get("extra") or {}
        from dpseg.model.config import DPSegConfig

        cfg = DPSegConfig.from_dict(config["model"])
        self.bank = None
        info: dict = {}
        if cfg.uses_visual:
            self.bank = open_bank(str(bank) if bank else None, facts, self.checkpoint)
            info = bank_encoder_info(self.bank, facts["encoder"], facts["encoder_weights"])
        self.bank_dir = str(self.bank.root) if self.bank is not None else None
        # given weights, or (a recorded local file that is gone) the bank's file stands in
        rebuild_from = tower_weights(encoder_weights, facts, info if cfg.uses_visual else None)[1]
        self.model = load_dpseg(self.checkpoint, self.device, encoder_weights=rebuild_from).eval()
        self.cfg = self.model.cfg
        self.size = int(size or facts["size"] or self.model.encoder_spec.image_size)
        if self.size < 32 or self.size % 32:
            raise UserError(f"model input size {self.size} must be a positive multiple of 32; pass --size")
        bank_size = info.get("encode_size") or info.get("prompt_size")
        self.encode_size = int(facts["encode_size"] or bank_size or self.model.prompt_encoder.image_size)
        self.merge, self.share = pass2_merge(facts)  # as the decoder met crop prompts in training
        self._text: dict[str, torch.Tensor] = {}
        self._protos: dict[str, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}

    # ---- prompts ------------------------------------------------------------------------------
    def kinds(self) -> list[str]:
        """The prompt kinds this checkpoint can run."""
        if not self.cfg.uses_visual:
            return ["text"]
        if not self.cfg.uses_text:
            return ["visual", "text"]
        return list(PROMPT_KINDS)

    def default_kind(self) -> str:
        return self.kinds()[0] if self.cfg.prompt_mode != "dual" else "dual"

    def bank_has(self, names: list[str]) -> list[bool]:
        if self.bank is None:
            return [False] * len(names)
        cats = set(self.bank.config.get("categories") or [])
        return [primary_name(n) in cats for n in names]

    def prompts(self, names: list[str], kind: str | None = None, generate: bool = False) -> Prompts:
        kind = kind or self.default_kind()
        if kind not in self.kinds():
            raise UserError(
                f"prompts {kind!r} do not fit this checkpoint (trained with prompt_mode {self.cfg.prompt_mode!r}); "
                f"choose one of: {', '.join(self.kinds())}"
            )
        have = self.bank_has(names)
        if generate and self.bank is not None and not all(have):
            from bank.reader import Bank
            from pipeline.evaluate.segment import generate_missing

            missing = [n for n, h in zip(names, have, strict=True) if not h]
            generate_missing(self.bank, missing, self.facts["encoder"], self.facts["encoder_weights"], self.encode_size)
            self.bank = Bank(self.bank.root)
            have = self.bank_has(names)
        text = self._text_prompts(names)
        visual = None
        if self.cfg.uses_visual:
            visual = self._visual_prompts(names, have, text)
            if kind == "text":
                visual = VisualPrompts(text.clone(), {s: torch.zeros_like(p) for s, p in visual.pooled.items()})
            elif kind == "visual" and self.cfg.uses_text:
                rows = torch.tensor([i for i, h in enumerate(have) if h], dtype=torch.long, device=text.device)
                text = text.clone()
                text[rows] = visual.embedding[rows].to(text)
        text_only = [n for n, h in zip(names, have, strict=True) if not h] if kind != "text" else list(names)
        return Prompts(list(names), kind, text, visual, text_only)

    def _text_prompts(self, names: list[str]) -> torch.Tensor:
        from pipeline.evaluate.setup import text_prompts

        new = [n for n in dict.fromkeys(names) if n not in self._text]
        if new:
            rows = text_prompts(self.model, new, None)[0]
            self._text.update({n: rows[i] for i, n in enumerate(new)})
        return torch.stack([self._text[n] for n in names]).to(self.device)

    def _visual_prompts(self, names: list[str], have: list[bool], text: torch.Tensor) -> VisualPrompts:
        """Bank prototypes where the bank has the class; the text embedding and zero pooled
        features (no visual cost) where it does not."""
        tower = self.model.prompt_encoder
        m = self.cfg.templates
        new = [n for n, h in zip(names, have, strict=True) if h and n not in self._protos]
        if new:
            protos = load_prototypes(self.bank, new, self.facts["encoder"], m, self.device, self.encode_size)
            for i, n in enumerate(new):
                self._protos[n] = (protos.embedding[i], {s: p[i] for s, p in protos.pooled.items()})
        emb = text.clone().to(self.device)
        pooled = {s: torch.zeros(len(names), m, tower.channels_at(s), device=self.device) for s in (4, 8, 16)}
        for i, (n, h) in enumerate(zip(names, have, strict=True)):
            if h:
                emb[i] = self._protos[n][0].to(emb)
                for s in pooled:
                    pooled[s][i] = self._protos[n][1][s].to(pooled[s])
        return VisualPrompts(emb, pooled)

    # ---- one image ----------------------------------------------------------------------------
    def model_input(self, image: np.ndarray) -> torch.Tensor:
        resized = Image.fromarray(image).resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(resized).copy())
        return x.permute(2, 0, 1)[None].float().div(255).to(self.device)

    def run(
        self,
        image: np.ndarray,
        prompts: Prompts,
        passes: int = 2,
        min_area: int = DEFAULT_MIN_AREA,
        crop: str = "masked",
        instances: int = 0,
    ) -> Segmentation:
        """Pass I with the prompts, then (passes=2) pass II with every detected class's visual
        prompts given its crop of this image (all M slots, or the share the checkpoint was trained
        with: `pass2_merge`); labels at the image's own size."""
        if passes not in (1, 2):
            raise UserError(f"passes must be 1 or 2, got {passes}")
        if passes == 2 and prompts.visual is None:
            raise UserError(
                f"the checkpoint uses no visual prompts (prompt_mode {self.cfg.prompt_mode!r}): pass II has "
                "nothing to refine; use one pass"
            )
        model, chunk = self.model, self.class_chunk
        refine = RefineSettings(self.encode_size, min_area, crop, instances, merge=self.merge, share=self.share)
        images01 = self.model_input(image)
        out = Segmentation(prompts, image, images01, None, {}, refine=refine)
        with torch.inference_mode():
            out.features = model.encode_image(model.image_encoder.normalize(images01))
            logits = model(text=prompts.text, visual=prompts.visual, features=out.features, class_chunk=chunk)
            out.preds[1] = predict_labels(logits, image.shape[:2], chunk)[0].cpu().numpy()
            if passes == 2:
                out.detect_map = predict_labels(logits, (self.size, self.size), chunk)
                out.refinement = refine_batch(model, images01, out.detect_map, refine)[0]
                visual2 = replace_prompts(prompts.visual, [out.refinement], refine.merge, refine.share)
                logits2 = model(text=prompts.text, visual=visual2, features=out.features, class_chunk=chunk)
                out.preds[2] = predict_labels(logits2, image.shape[:2], chunk)[0].cpu().numpy()
        return out

    def crops(self, seg: Segmentation) -> dict[int, list[np.ndarray]]:
        """The crops pass II encoded, as (S, S, 3) uint8 pictures per detected class index
        (dpseg.refine's own cropping, replayed on the same model input)."""
        if seg.refinement is None or seg.refinement.classes.numel() == 0:
            return {}
        tower = self.model.prompt_encoder
        fill = tower.mean.view(3).to(seg.images01)
        classes = seg.refinement.classes.to(seg.detect_map.device)
        pieces, counts, kept = image_crops(seg.images01[0], seg.detect_map[0], classes, seg.refine, fill)
        out, start = {}, 0
        for c, k in zip(kept, counts, strict=True):
            out[int(c)] = [
                (p.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy() for p in pieces[start : start + k]
            ]
            start += k
        return out

    def cost_maps(self, seg: Segmentation, index: int) -> dict[str, np.ndarray]:
        """`dpseg analyze heatmap`'s maps for one class of this image, with this checkpoint's image
        tower: mean over templates of cos(dense stride-32 embedding, prompt) for the text, the
        bank's visual and the dual prompt (and the pass-II crop prompt when pass II ran),
        upsampled to the image's size."""
        from pipeline.analyze.heatmap import prompt_costs, template_mean_cost, upsample

        p = seg.prompts
        text = p.text[index : index + 1]
        visual = p.visual.embedding[index : index + 1] if p.visual is not None else text
        with torch.inference_mode():
            maps = prompt_costs(seg.features.dense, text, visual)
            if seg.refinement is not None and index in seg.refinement.classes.tolist():
                refined = replace_prompts(p.visual, [seg.refinement]).embedding[0, index : index + 1]
                maps["crop (pass II)"] = template_mean_cost(seg.features.dense, refined)
            return {k: upsample(v.float(), seg.image.shape[:2])[0].cpu().numpy() for k, v in maps.items()}
