"""The cost-volume-guided decoder (paper §4.2, with SED's up-blocks and aux heads).

Sized from the encoder's declared channels and strides, never from a table:

  stride 32: initial cost (B, M, N, h, w) --7x7 conv per class--> (B, N, 128, h, w)
  stage k (k = 0, 1, 2; in dims 128, 64, 32; out dims 64, 32, 16; strides 16, 8, 4):
     [aux head k: 3x3 conv on the detached state -> one logit map per class (strides 32/16/8)]
     aggregate: x + gamma * GELU-MLP(LN(HDC(x))) (SED's layer-scaled ConvNeXt block with the
        paper's HDC), then the class block on a pooled grid, p + Attn(LN(p)), p + ReLU-MLP(LN(p)),
        upsampled and added to the un-pooled state (SED's class transformer layer)
     -> fusion: 2x2 deconv to (in - g_k) channels, concat the detached encoder skip (3x3 conv
        to g_k = 32/16/8, ReLU) and the cost guidance (g_k channels: Eq. 2's visual cost volume,
        or the upsampled-cost chain, or nothing), two rounds of 3x3 conv + GroupNorm + ReLU
  head: 3x3 conv -> one logit map per class at stride 4.

Classes can be decoded in chunks (class attention needs only a per-pixel summary over all
classes), and at inference classes that are in no pixel's top-k at an aux head can be dropped
from the finer stages (SED's early rejection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dpseg.model.blocks import AggregationBlock, ClassAttention, CostGuidance, StageFusion, UpsampledCostChain
from dpseg.model.config import DPSegConfig

# What a rejected class scores: below any real logit, finite in fp16 (sigmoid gives 0, like SED).
REJECTED_LOGIT = -1e4


@dataclass
class DecoderInputs:
    """Everything the decoder needs for one set of classes."""

    cost: torch.Tensor  # initial cost (B, M', N, h, w)
    levels: dict[int, torch.Tensor]  # encoder features by stride
    guidance_prompts: dict[int, torch.Tensor] | None  # stride -> (N|B,N, M, C_l) for visual_guidance "prompt"
    guidance_crops: torch.Tensor | None = None  # (B, N, M) marks of the slots holding crops (crop_channels)


@dataclass
class PassContext:
    """What a decode of all classes leaves for a later decode of some of them on the same image
    features (fast pass II): per stage, the class-attention summary over all classes, the encoder
    skip (class-independent), and each class's attention keys and values (with the classes they
    belong to where early rejection dropped some), so that `without` can take classes out of the
    summaries again."""

    summaries: list = field(default_factory=list)
    skips: list = field(default_factory=list)
    class_states: list = field(default_factory=list)  # per stage: (keys, values, kept class indices or None)
    adds_own: bool = False  # the decoded classes add their own keys and values to `summaries`

    def without(self, index: torch.Tensor) -> PassContext:
        """The context in which to decode the classes `index` (B, K) of each image again: every
        stage's summary less those classes' contributions from this decode, to which the new
        decode adds its own. The classes then attend over themselves as they are now and over
        the others as they were, which is the exact summary but for the other classes' own
        change."""
        if len(self.class_states) != len(self.summaries):
            raise ValueError("this context holds no per-class keys and values (pass it as context_out first)")
        summaries = []
        for (kv, k_sum), (keys, values, kept) in zip(self.summaries, self.class_states, strict=True):
            if keys is None:
                raise ValueError("this context's decode attended against another context: it holds no keys")
            rows, present = index, None
            if kept is not None:  # positions among the classes this stage still decoded; -1: rejected
                position = torch.full((int(max(index.max(), kept.max())) + 1,), -1, device=kept.device)
                position[kept] = torch.arange(kept.numel(), device=kept.device)
                rows = position[index]
                present, rows = rows >= 0, rows.clamp(min=0)
            picked_k, picked_v = (
                t.gather(1, rows.view(*rows.shape, 1, 1, 1, 1).expand(*rows.shape, *t.shape[2:]))
                for t in (keys, values)
            )
            if present is not None:
                picked_k = picked_k * present.view(*rows.shape, 1, 1, 1, 1).to(picked_k.dtype)
            own_kv, own_k = ClassAttention.summary_of(picked_k, picked_v)
            summaries.append((kv - own_kv, k_sum - own_k))
        return PassContext(summaries, self.skips, [], adds_own=True)

    def add_stage(self, summary, skip, keys, values, kept: torch.Tensor | None = None) -> None:
        """One decoder stage's record: the summary its classes attended against, the encoder skip,
        and these classes' keys and values (None where they were not computed)."""
        self.summaries.append(summary)
        self.skips.append(skip)
        self.class_states.append((keys, values, kept))


@dataclass
class DecoderState:
    """The per-class state between decoder steps."""

    x: torch.Tensor  # (B, N, C, H, W)
    chain: torch.Tensor | None  # upsampled-cost chain state (B*N, C, H, W)
    prompts: dict[int, torch.Tensor] | None  # visual-guidance prompts of these classes
    levels: dict[int, torch.Tensor]  # encoder features by stride (class-independent)
    crops: torch.Tensor | None = None  # (B, N, M) marks of the prompt slots holding crops

    def select(self, keep: torch.Tensor) -> DecoderState:
        """The state of the classes `keep` (indices into this state's classes)."""
        b = self.x.shape[0]
        chain = None
        if self.chain is not None:
            chain = self.chain.view(b, -1, *self.chain.shape[1:]).index_select(1, keep).flatten(0, 1)
        prompts = None
        if self.prompts is not None:
            prompts = {s: p.index_select(p.dim() - 3, keep) for s, p in self.prompts.items()}
        crops = None if self.crops is None else self.crops.index_select(1, keep)
        return DecoderState(self.x.index_select(1, keep), chain, prompts, self.levels, crops)


def kept_classes(aux_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the classes ranked in the top k at any pixel of any image (SED's rule)."""
    n = aux_logits.shape[1]
    top = aux_logits.topk(min(k, n), dim=1).indices.flatten()
    return torch.nonzero(torch.bincount(top, minlength=n) > 0).flatten()


class CostDecoder(nn.Module):
    def __init__(self, cfg: DPSegConfig, encoder_channels: dict[int, int], cost_channels: int):
        super().__init__()
        self.cfg = cfg
        missing = [s for s in cfg.guidance_strides if s not in encoder_channels]
        if missing:
            raise ValueError(f"encoder has no features at strides {missing}; it has {sorted(encoder_channels)}")
        self.cost_embed = nn.Conv2d(cost_channels, cfg.cost_dim, cfg.cost_kernel, padding=cfg.cost_kernel // 2)
        in_dims = (cfg.cost_dim, *cfg.decoder_dims[:-1])
        self.blocks = nn.ModuleList(
            AggregationBlock(
                d,
                cfg.attention_heads,
                cfg.mlp_ratio,
                cfg.hdc_depthwise,
                cfg.attention_pool_train,
                cfg.attention_pool_eval,
                cfg.layer_scale_init,
                cfg.class_mlp,
            )
            for d in in_dims
        )
        self.skips = nn.ModuleList(
            nn.Sequential(nn.Conv2d(encoder_channels[s], g, 3, padding=1), nn.ReLU())
            for s, g in zip(cfg.guidance_strides, cfg.guidance_dims, strict=False)
        )
        # cost guidance: per-stage projections of Eq. 2's volume, or SED's deconv chain, or none
        self.guidance = nn.ModuleDict()
        upsampled = cfg.visual_guidance == "upsampled-cost"
        self.cost_chain = UpsampledCostChain(cost_channels, cfg.guidance_dims) if upsampled else None
        for k, g in enumerate(cfg.guidance_dims):
            if cfg.visual_guidance == "prompt" and cfg.stage_has_guidance(k):
                self.guidance[str(k)] = CostGuidance(cfg.templates, g, cfg.crop_channels)
        self.fusions = nn.ModuleList(
            StageFusion(d_in, d_out, g, g if cfg.stage_has_guidance(k) else 0)
            for k, (d_in, d_out, g) in enumerate(zip(in_dims, cfg.decoder_dims, cfg.guidance_dims, strict=False))
        )
        self.aux_heads = nn.ModuleList(nn.Conv2d(d, 1, 3, padding=1) for d in in_dims) if cfg.deep_supervision else None
        self.head = nn.Conv2d(cfg.decoder_dims[-1], 1, 3, padding=1)

    @property
    def num_stages(self) -> int:
        return len(self.blocks)

    # ---- the steps, used by forward() and by chunked decoding --------------------------------
    def embed(self, inputs: DecoderInputs) -> DecoderState:
        """1. the cost embedding at stride 32 (and the start of the upsampled-cost chain)."""
        cost = inputs.cost
        b, _, n, h, w = cost.shape
        x = self.cost_embed(cost.transpose(1, 2).flatten(0, 1)).view(b, n, -1, h, w)
        chain = cost.transpose(1, 2).flatten(0, 1) if self.cost_chain is not None else None
        return DecoderState(x, chain, inputs.guidance_prompts, inputs.levels, inputs.guidance_crops)

    def aux_logits(self, k: int, state: DecoderState) -> torch.Tensor:
        """Aux head k on the detached state (SED: aux losses train only their own heads)."""
        x = state.x
        return self.aux_heads[k](x.detach().flatten(0, 1)).view(x.shape[0], x.shape[1], *x.shape[-2:])

    def skip(self, k: int, levels: dict[int, torch.Tensor]) -> torch.Tensor:
        """Stage k's encoder skip: the same for every class (no gradient into the encoder)."""
        return self.skips[k](levels[self.cfg.guidance_strides[k]].detach())

    def fuse(self, k: int, x: torch.Tensor, state: DecoderState, skip: torch.Tensor | None = None) -> DecoderState:
        """Stage k's fusion with the detached encoder skip (computed unless given) and the cost
        guidance of the next stride."""
        cfg = self.cfg
        b = x.shape[0]
        stride = cfg.guidance_strides[k]
        features = state.levels[stride]
        skip = self.skip(k, state.levels) if skip is None else skip
        guidance, chain = None, state.chain
        if chain is not None:
            chain = self.cost_chain.step(k, chain, tuple(features.shape[-2:]))
            if cfg.stage_has_guidance(k):
                guidance = chain.view(b, -1, *chain.shape[1:])
        elif str(k) in self.guidance:
            f = features if cfg.guidance_grad else features.detach()
            guidance = self.guidance[str(k)](f, state.prompts[stride], state.crops)
        return DecoderState(self.fusions[k](x, skip, guidance), chain, state.prompts, state.levels, state.crops)

    def logits(self, state: DecoderState) -> torch.Tensor:
        x = state.x
        return self.head(x.flatten(0, 1)).view(x.shape[0], x.shape[1], *x.shape[-2:])

    def forward(
        self,
        inputs: DecoderInputs,
        aux: bool = False,
        reject_topk: int | None = None,
        context: PassContext | None = None,
        context_out: PassContext | None = None,
    ):
        """Returns (logits (B, N, H/4, W/4), aux logits [(B, N, h, w) at strides 32, 16, 8] or []).

        With `reject_topk`, classes outside every pixel's top k at an aux head skip the finer
        stages and score REJECTED_LOGIT (their aux logits too, from the next head on).
        `context_out` receives each stage's class-attention summary and encoder skip; `context`
        (one from a decode of the same image features) makes these classes attend against its
        summaries instead of against each other, and reuses its skips: a subset of the classes
        decoded in the context of all of them (fast pass II)."""
        state = self.embed(inputs)
        n = state.x.shape[1]
        keep = None  # indices (into all N) of the classes still decoded; None: all
        aux_logits: list[torch.Tensor] = []
        for k in range(self.num_stages):
            # 2. aux head (and early rejection on its ranking)
            if self.aux_heads is not None and (aux or reject_topk):
                a = self.aux_logits(k, state)
                aux_logits.append(self._scatter(a, keep, n))
                if reject_topk:
                    local = kept_classes(a, reject_topk)
                    if local.numel() < state.x.shape[1]:
                        state = state.select(local)
                        keep = local if keep is None else keep[local]
            # 3. aggregation at this stage's input width, 4. fusion
            summary, skip = (context.summaries[k], context.skips[k]) if context is not None else (None, None)
            record = [] if context_out is not None else None
            x = self.blocks[k](state.x, summary, context is not None and context.adds_own, record)
            if context_out is not None:
                skip = self.skip(k, state.levels) if skip is None else skip
                context_out.add_stage(record[0][0], skip, *record[0][1:], keep)
            state = self.fuse(k, x, state, skip)
        # 5. one logit map per class at stride 4
        logits = self.logits(state)
        return (self._scatter(logits, keep, n) if keep is not None else logits), aux_logits

    @staticmethod
    def _scatter(values: torch.Tensor, keep: torch.Tensor | None, n: int) -> torch.Tensor:
        """Values of the kept classes -> all n classes, REJECTED_LOGIT elsewhere."""
        if keep is None:
            return values
        out = values.new_full((values.shape[0], n, *values.shape[2:]), REJECTED_LOGIT)
        out[:, keep] = values
        return out
