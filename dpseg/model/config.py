"""DPSeg's resolved configuration: saved into every checkpoint and summary.

Every field is explained, with its source (paper, SED or our decision), in docs/model.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dpseg.errors import UserError

# Bumped whenever the network's structure or parameter names change, so a checkpoint of an
# older network is refused with one line instead of failing deep inside load_state_dict.
# 1: the first network; 2: SED fusion blocks, aux heads, ConvTranspose cost chain;
# 3: SED's block layout (layer-scaled spatial residual, pooled class block with its MLP added to
#    the un-pooled input, class attention without an output projection).
CONFIG_VERSION = 3

PROMPT_MODES = ("text", "visual", "dual")
FUSIONS = ("avg-embeddings", "concat-costs", "avg-costs")  # paper Table 2b
VISUAL_GUIDANCE = ("prompt", "upsampled-cost", "none")  # paper Table 3
IGNORE_POLICIES = ("negative", "exclude")


@dataclass
class DPSegConfig:
    encoder: str = "convnext-b"
    templates: int = 80
    prompt_mode: str = "dual"
    fusion: str = "avg-embeddings"
    visual_guidance: str = "prompt"
    guidance_stages: tuple[bool, ...] = (True, True, True)  # Table 3: visual guidance on/off per stage
    guidance_grad: bool = False  # visual cost volumes back-propagate into the image tower (paper §4.2: no)
    cost_dim: int = 128  # SED: the 7x7 conv maps the 80 template channels to 128
    cost_kernel: int = 7
    decoder_dims: tuple[int, ...] = (64, 32, 16)  # paper "[62, 32, 16]": read as 64 (docs/model.md)
    guidance_strides: tuple[int, ...] = (16, 8, 4)
    guidance_dims: tuple[int, ...] = (32, 16, 8)  # SED DECODER_GUIDANCE_PROJ_DIMS: skip and cost-guidance widths
    attention_heads: int = 4
    mlp_ratio: int = 4  # SED: both MLPs of a stage (spatial ConvNeXt block, class transformer) are x4
    hdc_depthwise: bool = True  # HDC as depthwise convs, like SED's depthwise spatial block
    layer_scale_init: float = 1.0  # SED builds its spatial ConvNeXt blocks with layer scale 1.0
    class_mlp: bool = True  # SED's class transformer has an MLP (ReLU) after the attention
    attention_pool_train: int = 2  # SED POOLING_SIZES [2, 2] in training ...
    attention_pool_eval: int = 1  # ... and [1, 1] in its evaluation script
    deep_supervision: bool = True  # SED: aux class heads at strides 32/16/8, BCE on all four outputs
    class_reject_topk: int | None = None  # SED's fast inference (off in its released configs)
    drop_path: float | None = None  # image tower stochastic depth; None: the encoder's SED value
    head_dropout: float | None = None  # image tower head dropout; None: the encoder's SED value
    class_chunk: int | None = None  # decode this many classes at a time (same logits)
    image_lr_multiplier: float = 0.01  # SED's CLIP multiplier
    ignore_policy: str = "negative"  # SED counts ignored pixels as negatives
    # not in the paper: prompt slots that carry the image's own crop (pass II; crop-prompt training)
    # reach the cost embedding and the cost guidance through weights of their own, so the decoder
    # can tell a crop prompt from a bank prompt (docs/model.md); off with prompt_mode text (no such slots)
    crop_channels: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("decoder_dims", "guidance_strides", "guidance_dims"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        self.guidance_stages = tuple(bool(v) for v in self.guidance_stages)
        if self.prompt_mode == "text":  # no visual prompt slots to mark (a profile's default stays harmless)
            self.crop_channels = False
        if self.drop_path is None or self.head_dropout is None:
            from dpseg.clip.encoders import ENCODERS

            spec = ENCODERS.get(self.encoder)
            self.drop_path = spec.drop_path if self.drop_path is None else self.drop_path
            self.head_dropout = spec.head_dropout if self.head_dropout is None else self.head_dropout
        self.validate()

    def validate(self) -> None:
        for name, value, allowed in (
            ("prompt_mode", self.prompt_mode, PROMPT_MODES),
            ("fusion", self.fusion, FUSIONS),
            ("visual_guidance", self.visual_guidance, VISUAL_GUIDANCE),
            ("ignore_policy", self.ignore_policy, IGNORE_POLICIES),
        ):
            if value not in allowed:
                raise UserError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.prompt_mode == "text" and self.visual_guidance == "prompt":
            raise UserError(
                "prompt_mode 'text' has no visual prompts for the visual cost volumes: "
                "set visual_guidance 'upsampled-cost' or 'none'"
            )
        if self.prompt_mode != "dual" and self.fusion != "avg-embeddings":
            raise UserError(f"fusion {self.fusion!r} combines text and visual prompts: it needs prompt_mode 'dual'")
        if not isinstance(self.crop_channels, bool):
            raise UserError(f"crop_channels is true or false, got {self.crop_channels!r}")
        stages = len(self.decoder_dims)
        for name in ("guidance_strides", "guidance_dims", "guidance_stages"):
            if len(getattr(self, name)) != stages:
                raise UserError(f"{name} must have one entry per decoder stage ({stages}, as decoder_dims)")
        if self.class_chunk is not None and self.class_chunk < 1:
            raise UserError(f"class_chunk must be positive, got {self.class_chunk}")
        if self.class_reject_topk is not None:
            if self.class_reject_topk < 1:
                raise UserError(f"class_reject_topk must be positive, got {self.class_reject_topk}")
            if not self.deep_supervision:
                raise UserError("class_reject_topk ranks classes with the aux heads: it needs deep_supervision on")
        for name in ("attention_pool_train", "attention_pool_eval"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.layer_scale_init <= 0:
            raise UserError(f"layer_scale_init must be positive, got {self.layer_scale_init}")
        for name in ("drop_path", "head_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def uses_text(self) -> bool:
        return self.prompt_mode in ("text", "dual")

    @property
    def uses_visual(self) -> bool:
        return self.prompt_mode in ("visual", "dual") or self.visual_guidance == "prompt"

    @property
    def cost_channels(self) -> int:
        """Channels of the cost embedding's input: M per cost volume (text and visual with
        concat-costs), and M more for the crop slots' own channels with crop_channels."""
        return self.templates * (1 + (self.fusion == "concat-costs") + self.crop_channels)

    def stage_has_guidance(self, stage: int) -> bool:
        return self.visual_guidance != "none" and self.guidance_stages[stage]

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("decoder_dims", "guidance_strides", "guidance_dims", "guidance_stages"):
            d[name] = list(getattr(self, name))
        d["config_version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DPSegConfig:
        version = d.get("config_version", CONFIG_VERSION)  # a hand-written dict is read as current
        if version != CONFIG_VERSION:
            raise UserError(
                f"model config version {version} is not this dpseg's version {CONFIG_VERSION} (the network changed: "
                "retrain, or use the dpseg release that wrote it)"
            )
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
