"""The generator interface and registry: a batch of requests (prompt + seed, with the category
and template they come from) -> RGB images in [0, 1] (+ optional alpha)."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from dpseg.errors import UserError
from dpseg.registry import Registry


@dataclass(frozen=True)
class Request:
    prompt: str
    seed: int  # one torch.Generator per image is seeded from it
    category: str = ""
    template: str = "{}"  # the format string the prompt came from


@dataclass
class Generated:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1]; may hold NaN (the build checks)
    alpha: torch.Tensor | None = None  # (B, 1, H, W) in [0, 1] for generators that make RGBA
    failures: list[str | None] | None = None  # per image: a failure the generator itself knows of ("nsfw")
    notes: list[str | None] | None = None  # per image: a recovery the generator made ("fp32-decode")


@dataclass
class GeneratorSettings:
    """What a user may set; None = the generator's documented default."""

    model: str | None = None
    model_config: str | None = None  # single-file checkpoints: a diffusers config folder or hub id (`config=`)
    resolution: int | None = None
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    negative_prompt: str | None = None
    safety_checker: bool | None = None
    t5: bool | None = None  # sd3 only
    device: str = "cpu"
    dtype: str = "auto"  # auto = fp16 on cuda, fp32 on cpu
    compile: tuple[str, ...] = ()  # "unet", "vae": torch.compile those; "channels-last" (speed only)
    extra: dict[str, Any] = field(default_factory=dict)


class Generator(ABC):
    """`settings` fixes what an image looks like and is hashed into every entry's identity;
    `runtime` (device, dtype, compile) is recorded but not hashed."""

    id: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    makes_alpha: ClassVar[bool] = False

    def __init__(self, settings: dict[str, Any], runtime: dict[str, Any]):
        self.settings = settings
        self.runtime = runtime

    @classmethod
    @abstractmethod
    def create(cls, options: GeneratorSettings) -> Generator: ...

    @abstractmethod
    def generate(self, requests: Sequence[Request]) -> Generated: ...

    @property
    def settings_hash(self) -> str:
        return settings_hash(self.id, self.settings)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "settings": self.settings, "settings_hash": self.settings_hash, "runtime": self.runtime}


def settings_hash(generator_id: str, settings: dict[str, Any]) -> str:
    blob = json.dumps({"id": generator_id, "settings": settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pick(value, default):
    return default if value is None else value


def torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if name not in table:
        raise UserError(f"unknown dtype {name!r}; use auto, fp32, fp16 or bf16")
    return table[name]


def runtime_of(options: GeneratorSettings, dtype: torch.dtype) -> dict[str, Any]:
    """What is recorded but not hashed: where and how the images were made."""
    return {"device": str(options.device), "dtype": str(dtype).removeprefix("torch."), "compile": list(options.compile)}


GENERATORS: Registry[type[Generator]] = Registry("generator")


def create_generator(spec: str, options: GeneratorSettings | None = None) -> Generator:
    """`spec` is a registered id (`sd15`, `tiny-sd`, ...). `noise:<r>` is derived from a bank."""
    import bank.generators  # noqa: F401  (registers the built-in generators)

    if spec.startswith("noise:") or spec == "noise":
        raise UserError(
            f"generator {spec!r} is derived from another bank: use `dpseg bank derive --from DIR --noise R --out DIR2`"
        )
    cls = GENERATORS.get(spec)
    return cls.create(options or GeneratorSettings())


def options_dict(options: GeneratorSettings) -> dict[str, Any]:
    return asdict(options)
