"""`sd15-random`: the real SD1.5 architecture (UNet 860M, VAE 84M, CLIP-L text 123M) from its
config values with random weights, built directly on the device. Same cost per step as SD1.5
with real weights (random images): for speed measurements where weights cannot be fetched."""

from __future__ import annotations

from bank.generators.base import GENERATORS, GeneratorSettings, pick, runtime_of, torch_dtype
from bank.generators.diffusion import DiffusionGenerator, compile_modules, set_scheduler
from bank.generators.sd15 import SD15Generator
from bank.generators.sd_configs import SD15_TEXT, SD15_UNET, SD15_VAE, build_sd_pipeline
from dpseg.errors import UserError


@GENERATORS.register("sd15-random")
class SD15RandomGenerator(DiffusionGenerator):
    id = "sd15-random"
    defaults = dict(SD15Generator.defaults, model="sd15-architecture-random-seed0", safety_checker=False)

    @classmethod
    def create(cls, options: GeneratorSettings):
        if options.safety_checker:
            raise UserError("sd15-random has no safety checker (random weights): drop --safety-checker")
        d = cls.defaults
        dtype = torch_dtype(options.dtype, options.device)
        pipe = build_sd_pipeline(SD15_UNET, SD15_VAE, SD15_TEXT, seed=0, device=options.device, dtype=dtype)
        settings = {
            "model": d["model"],
            "resolution": pick(options.resolution, d["resolution"]),
            "steps": pick(options.steps, d["steps"]),
            "guidance": float(pick(options.guidance, d["guidance"])),
            "scheduler": pick(options.scheduler, d["scheduler"]),
            "negative_prompt": pick(options.negative_prompt, d["negative_prompt"]),
            "safety_checker": False,
        }
        set_scheduler(pipe, settings["scheduler"])
        compile_modules(pipe, options.compile)
        return cls(pipe, settings, runtime_of(options, dtype))
