"""DPSeg: image tower + dual-prompt cost volume + cost-volume-guided decoder.

model = build_dpseg(DPSegConfig(encoder="convnext-b"), weights=None)
features = model.encode_image(images)            # reusable by pass II
logits = model(text=T, visual=V, features=features)   # (B, N, H/4, W/4)
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn

from dpseg.clip import ClipTowers, ImageFeatures, load_clip
from dpseg.clip.templates import templates as first_templates
from dpseg.errors import UserError
from dpseg.model.blocks import AttentionSummary
from dpseg.model.config import DPSegConfig
from dpseg.model.cost_volume import crop_channels, initial_cost
from dpseg.model.decoder import CostDecoder, DecoderInputs, PassContext
from dpseg.model.prompts import VisualPrompts


class DPSeg(nn.Module):
    def __init__(self, towers: ClipTowers, cfg: DPSegConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder_spec = towers.spec
        self.weights = towers.weights
        self.image_encoder = towers.image  # fine-tuned with cfg.image_lr_multiplier
        self.image_encoder.set_regularization(cfg.drop_path, cfg.head_dropout)
        if cfg.image_lr_multiplier == 0:  # a frozen tower: no backward pass through it at all
            self.image_encoder.freeze()
        self.prompt_encoder = towers.prompt  # frozen copy: generated images and pass-II crops
        self.text_encoder = towers.text  # frozen
        encoder_channels = dict(zip(self.image_encoder.strides, self.image_encoder.channels, strict=False))
        self.decoder = CostDecoder(cfg, encoder_channels, cfg.cost_channels)
        self.compiled_decoder = None  # a plain function (not a submodule): see compile_decoder

    def compile_decoder(self, backend: str = "inductor", mode: str | None = None) -> None:
        """torch.compile the one-pass decoder (fuses its per-class elementwise chains and layout
        copies). Speed only: the parameters and state dict stay the decoder's own (the compiled
        function is not a submodule); chunked decoding and training keep the eager modules. A new
        class count or batch size recompiles once, then shapes are marked dynamic."""
        self.compiled_decoder = torch.compile(self.decoder.forward, backend=backend, mode=mode)

    # ---- prompts -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, class_names: list[str]) -> torch.Tensor:
        """(N, M, D) text prompts from the frozen text tower (cached per class name)."""
        return self.text_encoder.encode_classes(class_names, first_templates(self.cfg.templates))

    @torch.no_grad()
    def encode_prompt_images(
        self, images: torch.Tensor, size: int | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """RGB [0, 1] prompt images (K, 3, H, W), resized to `size` (default: the segmenter's input
        size, as the bank encodes) -> global (K, D) and pooled {stride: (K, C_l)}."""
        tower = self.prompt_encoder
        out = tower.encode_prompts(tower.normalize(tower.resize(images, size)), self.cfg.guidance_strides)
        return out.embedding, out.pooled

    # ---- image ---------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """CLIP-normalised images (B, 3, H, W), H and W multiples of 32."""
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise UserError(f"image size {tuple(images.shape[-2:])} must be a multiple of 32 (the encoder's stride)")
        return self.image_encoder(images)

    # ---- decoding ------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        visual: VisualPrompts | None = None,
        features: ImageFeatures | None = None,
        class_chunk: int | None = None,
        aux: bool = False,
        context: PassContext | None = None,
        context_out: PassContext | None = None,
    ):
        """Per-class logits (B, N, H/4, W/4); with `aux`, (logits, aux_logits) where aux_logits
        are the aux heads' (B, N, h, w) maps at strides 32, 16, 8 ([] without deep supervision).

        `context_out` (a `PassContext`) receives every decoder stage's class-attention summary
        over these classes and its encoder skip; `context` (one from a decode of the same
        features) makes these classes attend against it: fast pass II decodes k classes in the
        context of pass I's N.

        Pass `features` (from `encode_image`) to skip the image tower; `class_chunk` (or
        cfg.class_chunk) decodes classes in chunks with the same result as one pass, in bounded
        memory. At inference, cfg.class_reject_topk drops classes early (SED's fast inference);
        it decodes in one pass, as rejection already bounds the classes at fine strides."""
        # 1. image features: computed once, reused across chunks and by pass II
        if features is None:
            if images is None:
                raise ValueError("give images or precomputed features")
            features = self.encode_image(images)
        # 2. prompts
        num_classes = self._check_prompts(text, visual)
        # 3. decode at once (optionally rejecting classes early), or chunk by chunk against all
        #    classes' attention summaries
        reject = None if self.training else self.cfg.class_reject_topk
        chunk = class_chunk or self.cfg.class_chunk
        if reject or not chunk or chunk >= num_classes:
            # the compiled decoder is traced without a pass context; a decode that keeps or uses one runs eager
            compiled = self.compiled_decoder is not None and not self.training and context is context_out is None
            decode = self.compiled_decoder if compiled else self.decoder
            inputs = self._inputs(features, text, visual, slice(None))
            logits, aux_logits = decode(inputs, aux, reject, context, context_out)
            return (logits, aux_logits) if aux else logits
        logits, aux_logits = self._decode_in_chunks(
            features, text, visual, num_classes, chunk, aux, context, context_out
        )
        return (logits, aux_logits) if aux else logits

    def _decode_in_chunks(
        self,
        features: ImageFeatures,
        text,
        visual,
        num_classes: int,
        chunk: int,
        aux: bool,
        context: PassContext | None = None,
        context_out: PassContext | None = None,
    ):
        """Stage by stage over class chunks: each stage's attention summary is summed over all
        chunks before any chunk attends, so the logits equal one pass; nothing is recomputed, and
        at most one stage's state of all classes is held (the stride-4 stage runs chunk by chunk
        straight into the head)."""
        dec = self.decoder
        chunks = [slice(i, min(i + chunk, num_classes)) for i in range(0, num_classes, chunk)]
        states = [dec.embed(self._inputs(features, text, visual, c)) for c in chunks]
        aux_parts: list[list[torch.Tensor]] = [[] for _ in range(dec.num_stages)]
        logits = []
        for k in range(dec.num_stages):
            block = dec.blocks[k]
            if aux and dec.aux_heads is not None:
                aux_parts[k] = [dec.aux_logits(k, st) for st in states]
            prepared = []
            for j, st in enumerate(states):
                prepared.append(block.prepare(st.x))
                states[j] = replace(st, x=None)  # free the input state as soon as it is used
            record = [] if context_out is not None else None
            if context is None or context.adds_own:
                parts = [block.summarize_prepared(y, record) for y in prepared]
                summary = (sum(p[0] for p in parts), sum(p[1] for p in parts))
                del parts
            if context is not None:
                base: AttentionSummary = context.summaries[k]
                summary = (base[0] + summary[0], base[1] + summary[1]) if context.adds_own else base
                skip = context.skips[k]
            else:
                skip = dec.skip(k, features.levels)  # class-independent: once, not per chunk
            if context_out is not None:
                keys = torch.cat([r[1] for r in record], dim=1) if record else None
                values = torch.cat([r[2] for r in record], dim=1) if record else None
                context_out.add_stage(summary, skip, keys, values)
            for j, st in enumerate(states):
                st = dec.fuse(k, block.finish(prepared[j], summary), st, skip)
                prepared[j] = None
                if k == dec.num_stages - 1:
                    logits.append(dec.logits(st))
                    states[j] = None
                else:
                    states[j] = st
        aux_logits = [torch.cat(p, dim=1) for p in aux_parts if p]
        return torch.cat(logits, dim=1), aux_logits

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
            needed = cfg.guidance_strides if cfg.visual_guidance == "prompt" else ()
            missing = [s for s in needed if s not in visual.pooled]
            if missing:
                raise UserError(f"visual prompts lack pooled features at strides {missing}")
        for name, (_n, m) in shapes.items():
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
        cost = initial_cost(
            features.dense, text_c, visual_c.embedding if visual_c is not None else None, cfg.prompt_mode, cfg.fusion
        )
        crops = visual_c.crops if visual_c is not None and cfg.crop_channels else None
        if cfg.crop_channels:
            cost = crop_channels(cost, crops, cfg.templates)
        guidance = visual_c.pooled if cfg.visual_guidance == "prompt" else None
        return DecoderInputs(cost=cost, levels=features.levels, guidance_prompts=guidance, guidance_crops=crops)

    # ---- training ------------------------------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: decoder at `lr`, image tower at lr x image_lr_multiplier; within each,
        norm layers' parameters and biases get no weight decay (detectron2's WEIGHT_DECAY_NORM 0,
        which SED trains with; biases: our choice, see docs/model.md). The text and prompt
        towers are frozen and in no group."""
        groups = []
        for name, module, group_lr in (
            ("decoder", self.decoder, lr),
            ("image_encoder", self.image_encoder, lr * self.cfg.image_lr_multiplier),
        ):
            decay, no_decay = no_decay_split(module)
            groups.append({"name": name, "params": decay, "lr": group_lr, "weight_decay": weight_decay})
            groups.append({"name": f"{name}_no_decay", "params": no_decay, "lr": group_lr, "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        aux = self.decoder.aux_heads
        return {
            "params_trainable": trainable,
            "params_frozen": frozen,
            "params_decoder": sum(p.numel() for p in self.decoder.parameters()),
            "params_aux_heads": sum(p.numel() for p in aux.parameters()) if aux is not None else 0,
            "params_image_encoder": sum(p.numel() for p in self.image_encoder.parameters()),
        }


NORM_LAYERS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
)


def no_decay_split(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters of `module` split into (decayed, not decayed): norm layers' weights
    and every bias are not decayed. timm's LayerNorm2d subclasses nn.LayerNorm, so it counts."""
    decay, no_decay, seen = [], [], set()
    for sub in module.modules():
        for pname, p in sub.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(sub, NORM_LAYERS) or pname == "bias" else decay).append(p)
    return decay, no_decay


def build_dpseg(
    cfg: DPSegConfig | None = None, weights: str | os.PathLike | None = "default", device: str | torch.device = "cpu"
) -> DPSeg:
    """The network for `cfg.encoder`; `weights=None` gives random towers (built under
    torch.manual_seed(0), as the bank builds them; no download). The decoder is initialised from
    the caller's RNG."""
    cfg = cfg or DPSegConfig()
    towers = load_clip(cfg.encoder, weights=weights, device=device)
    return DPSeg(towers, cfg).to(device)
