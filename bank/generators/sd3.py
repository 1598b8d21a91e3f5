"""`sd3`: Stable Diffusion 3 (medium) through diffusers' `StableDiffusion3Pipeline` (gated
weights: log in to the hub once, or pass a local folder). `--no-t5` drops the 4.7B-parameter
T5 text encoder (text_encoder_3=None, tokenizer_3=None): less memory, slightly weaker prompts.
SD3 ships no safety checker, so `--safety-checker` is refused rather than silently ignored."""

from __future__ import annotations

from pathlib import Path

from bank.generators.base import GENERATORS, GeneratorSettings, pick, runtime_of, torch_dtype
from bank.generators.diffusion import DiffusionGenerator, compile_modules, quiet_loading
from bank.generators.sd15 import _from_pretrained, offline
from dpseg.errors import UserError

DEFAULT_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"


@GENERATORS.register("sd3")
class SD3Generator(DiffusionGenerator):
    id = "sd3"
    defaults = {
        "model": DEFAULT_MODEL,
        "resolution": 768,
        "steps": 28,
        "guidance": 7.0,
        "scheduler": "native",
        "negative_prompt": "",
        "t5": True,
    }

    @classmethod
    def create(cls, options: GeneratorSettings):
        from diffusers import StableDiffusion3Pipeline

        d = cls.defaults
        extra = options.extra or {}
        model = pick(options.model, d["model"])
        t5 = pick(options.t5, d["t5"])
        scheduler = pick(options.scheduler, d["scheduler"])
        if scheduler != "native":
            raise UserError("sd3 samples with its own flow-matching scheduler: leave --scheduler unset (native)")
        if options.safety_checker:
            raise UserError("sd3 ships no safety checker: drop --safety-checker (or use sd15, which has one)")
        dtype = torch_dtype(options.dtype, options.device)
        kwargs = {"torch_dtype": dtype}
        if not t5:
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
        path = Path(model).expanduser()
        if path.suffix == ".safetensors":
            raise UserError(
                f"sd3 loads diffusers folders or hub ids, not single files like {path.name}: "
                f"pass --model with a diffusers SD3 folder (model_index.json) or {DEFAULT_MODEL}"
            )
        if model.startswith((".", "/", "~")) and not path.is_dir():
            raise UserError(f"model folder {path} does not exist; pass a diffusers SD3 folder or a hub id")
        quiet_loading()
        local = {"local_files_only": True} if offline() else {}
        try:
            source = str(path) if path.is_dir() else model
            pipe = _from_pretrained(StableDiffusion3Pipeline, source, dtype, kwargs, local)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(
                f"could not load SD3 weights {model!r}: {type(err).__name__}: {first}; the hub "
                f"repository is gated: accept its licence and log in, or pass --model with a local "
                f"diffusers folder"
            ) from None
        pipe = pipe.to(options.device)
        settings = {
            "model": extra.get("model_id", model),
            "t5": bool(t5),
            "resolution": pick(options.resolution, d["resolution"]),
            "steps": pick(options.steps, d["steps"]),
            "guidance": float(pick(options.guidance, d["guidance"])),
            "scheduler": scheduler,
            "negative_prompt": pick(options.negative_prompt, d["negative_prompt"]),
        }
        compile_modules(pipe, options.compile)
        return cls(pipe, settings, runtime_of(options, dtype))
