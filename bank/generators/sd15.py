"""`sd15`: Stable Diffusion 1.5 through diffusers' `StableDiffusionPipeline`.

`--model` is a hub id (default below), a local diffusers directory, or one `.safetensors`
checkpoint in the original (single-file) layout."""

from __future__ import annotations

from pathlib import Path

import torch

from bank.generators.base import GENERATORS, GeneratorOptions, pick, torch_dtype
from bank.generators.diffusion import DiffusionGenerator, compile_modules, quiet_loading, set_scheduler
from dpseg.errors import UserError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def load_sd_pipeline(model: str, dtype: torch.dtype, device: str, safety_checker: bool | None):
    """Loads a StableDiffusionPipeline from a hub id, a diffusers directory or a single file."""
    from diffusers import StableDiffusionPipeline

    kwargs = {"torch_dtype": dtype}  # (newer diffusers also accept `dtype=`; this name works in all)
    if safety_checker is False:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    path = Path(model).expanduser()
    quiet_loading()
    try:
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise UserError(f"model file {path} does not exist; pass a .safetensors checkpoint, a diffusers directory or a hub id")
            pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
        elif path.is_dir():
            if not (path / "model_index.json").is_file():
                raise UserError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
            pipe = StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
        elif model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise UserError(f"model {model!r} is neither a file, a directory nor a hub id (owner/name)")
        else:
            pipe = StableDiffusionPipeline.from_pretrained(model, **kwargs)
    except UserError:
        raise
    except Exception as err:  # hub/network/format errors all mean: these weights cannot be loaded here
        raise UserError(f"could not load Stable Diffusion weights {model!r}: {type(err).__name__}: {err}; "
                        f"pass --model with a local diffusers directory or .safetensors file") from None
    return pipe.to(device)


@GENERATORS.register("sd15")
class SD15Generator(DiffusionGenerator):
    id = "sd15"
    defaults = {"model": DEFAULT_MODEL, "resolution": 768, "steps": 25, "guidance": 7.5, "scheduler": "dpm++",
                "negative_prompt": "", "safety_checker": True}

    @classmethod
    def create(cls, options: GeneratorOptions):
        return cls.load(options, pick(options.model, cls.defaults["model"]))

    @classmethod
    def load(cls, options: GeneratorOptions, model: str, model_id: str | None = None):
        """`model_id` names the weights in the settings when the path is not their identity."""
        d = cls.defaults
        dtype = torch_dtype(options.dtype, options.device)
        pipe = load_sd_pipeline(model, dtype, options.device, options.safety_checker)
        settings = {
            "model": model_id or model,
            "resolution": pick(options.resolution, d["resolution"]),
            "steps": pick(options.steps, d["steps"]),
            "guidance": float(pick(options.guidance, d["guidance"])),
            "scheduler": pick(options.scheduler, d["scheduler"]),
            "negative_prompt": pick(options.negative_prompt, d["negative_prompt"]),
            "safety_checker": getattr(pipe, "safety_checker", None) is not None,
        }
        set_scheduler(pipe, settings["scheduler"])
        compile_modules(pipe, options.compile)
        runtime = {"device": str(options.device), "dtype": str(dtype).removeprefix("torch."), "compile": list(options.compile)}
        return cls(pipe, settings, runtime)
