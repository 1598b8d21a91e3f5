"""DPSeg's resolved configuration: saved into every checkpoint and summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dpseg.errors import UserError

PROMPT_MODES = ("text", "visual", "dual")
FUSIONS = ("avg-embeddings", "concat-costs", "avg-costs")  # paper Table 2b
VISUAL_GUIDANCE = ("prompt", "upsampled-cost")  # paper Table 3
IGNORE_POLICIES = ("negative", "exclude")


@dataclass
class DPSegConfig:
    encoder: str = "convnext-b"
    templates: int = 80
    prompt_mode: str = "dual"
    fusion: str = "avg-embeddings"
    visual_guidance: str = "prompt"
    cost_dim: int = 128  # SED: the 7x7 conv maps the 80 template channels to 128
    cost_kernel: int = 7
    decoder_dims: tuple[int, ...] = (64, 32, 16)  # paper "[62, 32, 16]": read as 64 (docs/decisions.md)
    guidance_strides: tuple[int, ...] = (16, 8, 4)
    skip_reduction: int = 16  # encoder skips reduced 16x (B: 512/256/128 -> 32/16/8)
    attention_heads: int = 4
    mlp_ratio: int = 2
    class_chunk: int | None = None  # decode this many classes at a time (same logits)
    image_lr_multiplier: float = 0.01  # SED's backbone multiplier
    ignore_policy: str = "negative"  # SED counts ignored pixels as negatives
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.decoder_dims = tuple(self.decoder_dims)
        self.guidance_strides = tuple(self.guidance_strides)
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
                "set visual_guidance 'upsampled-cost'"
            )
        if self.prompt_mode != "dual" and self.fusion != "avg-embeddings":
            raise UserError(f"fusion {self.fusion!r} combines text and visual prompts: it needs prompt_mode 'dual'")
        if len(self.decoder_dims) != len(self.guidance_strides):
            raise UserError("decoder_dims and guidance_strides must have one entry per decoder stage")
        if self.class_chunk is not None and self.class_chunk < 1:
            raise UserError(f"class_chunk must be positive, got {self.class_chunk}")

    @property
    def uses_text(self) -> bool:
        return self.prompt_mode in ("text", "dual")

    @property
    def uses_visual(self) -> bool:
        return self.prompt_mode in ("visual", "dual") or self.visual_guidance == "prompt"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decoder_dims"] = list(self.decoder_dims)
        d["guidance_strides"] = list(self.guidance_strides)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DPSegConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
