"""`sd15`: Stable Diffusion 1.5 through diffusers' `StableDiffusionPipeline`.

`--model` is a hub id (default below), a local diffusers directory, or one `.safetensors`
checkpoint in the original (single-file) layout; a single file takes its component configs
from `--model-config` (a diffusers folder or hub id; default: the SD1.5 hub repository)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bank.generators.base import GENERATORS, GeneratorSettings, pick, runtime_of, torch_dtype
from bank.generators.diffusion import DiffusionGenerator, compile_modules, quiet_loading, set_scheduler
from dpseg.errors import UserError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_hub_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") == 1


def fp16_variant(model: str, dtype: torch.dtype) -> str | None:
    """Ask for the `fp16` files (half the download, the precision that is run) when running in
    fp16 and they exist: a hub id is asked (diffusers falls back per component), a folder checked."""
    if dtype != torch.float16:
        return None
    path = Path(model).expanduser()
    if path.is_dir():
        return "fp16" if any(path.glob("*/*.fp16.safetensors")) else None
    return "fp16"


def load_safety_checker(source: str, dtype: torch.dtype) -> dict:
    """The checker and its feature extractor from `source`'s `safety_checker/` and
    `feature_extractor/` (a single .safetensors file holds neither)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    local = {"local_files_only": True} if offline() else {}
    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(
            source, subfolder="safety_checker", torch_dtype=dtype, use_safetensors=True, **local
        )
        extractor = CLIPImageProcessor.from_pretrained(source, subfolder="feature_extractor", **local)
    except Exception as err:
        raise UserError(
            f"--safety-checker: no safety checker in {source!r} ({type(err).__name__}); "
            f"a single .safetensors file does not hold one: pass --model-config with a diffusers SD1.5 "
            f"folder or hub id that has safety_checker/ and feature_extractor/, "
            f"or --no-safety-checker"
        ) from None
    return {"safety_checker": checker, "feature_extractor": extractor, "requires_safety_checker": True}


def load_sd_pipeline(
    model: str, dtype: torch.dtype, device: str, safety_checker: bool | None, model_config: str | None = None
):
    """Loads a StableDiffusionPipeline from a hub id, a diffusers directory or a single file.
    `safety_checker`: True = must run (refused when it cannot), False = off, None = as shipped."""
    from diffusers import StableDiffusionPipeline

    kwargs = {"torch_dtype": dtype}  # (newer diffusers also accept `dtype=`; this name works in all)
    if safety_checker is False:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    local = {"local_files_only": True} if offline() else {}
    path = Path(model).expanduser()
    quiet_loading()
    try:
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise UserError(
                    f"model file {path} does not exist; pass a .safetensors checkpoint, "
                    f"a diffusers directory or a hub id"
                )
            config = _single_file_config(model_config)
            if safety_checker:  # from_single_file never loads the checker: load it from the configs
                kwargs.update(load_safety_checker(config, dtype))
            pipe = StableDiffusionPipeline.from_single_file(str(path), config=config, **kwargs, **local)
        elif path.is_dir():
            if not (path / "model_index.json").is_file():
                raise UserError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
            pipe = _from_pretrained(StableDiffusionPipeline, str(path), dtype, kwargs, local)
        elif not is_hub_id(model):
            raise UserError(f"model {model!r} is neither a file, a directory nor a hub id (owner/name)")
        else:
            pipe = _from_pretrained(StableDiffusionPipeline, model, dtype, kwargs, local)
    except UserError:
        raise
    except Exception as err:  # hub/network/format errors all mean: these weights cannot be loaded here
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"could not load Stable Diffusion weights {model!r}: {type(err).__name__}: {first}; "
            f"pass --model with a local diffusers directory or .safetensors file"
        ) from None
    if safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise UserError(
            f"--safety-checker: {model!r} ships no safety checker; pass --no-safety-checker "
            f"(recorded in the bank's settings) or a model that has one"
        )
    return pipe.to(device)


def _single_file_config(model_config: str | None) -> str:
    """`config=` for from_single_file. Without one diffusers fetches the hub repository's configs
    (and, when offline and not cached, tries the network anyway), so offline it must be given."""
    if model_config is None:
        if offline():
            raise UserError(
                "a single .safetensors checkpoint needs its component configs: pass --model-config DIR "
                "(a diffusers SD1.5 folder; weights not needed) "
                f"or unset HF_HUB_OFFLINE to use {DEFAULT_MODEL}'s"
            )
        return DEFAULT_MODEL
    path = Path(model_config).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"--model-config {path} is not a diffusers folder (no model_index.json)")
        return str(path)
    if not is_hub_id(model_config):
        raise UserError(f"--model-config {model_config!r} is neither a folder nor a hub id (owner/name)")
    return model_config


def _from_pretrained(cls, source: str, dtype: torch.dtype, kwargs: dict, local: dict):
    """safetensors only (no pickle), the fp16 variant when it applies."""
    variant = fp16_variant(source, dtype)
    try:
        return cls.from_pretrained(source, use_safetensors=True, variant=variant, **kwargs, **local)
    except ValueError as err:
        if variant and "variant" in str(err):  # a hub repository without fp16 files
            return cls.from_pretrained(source, use_safetensors=True, **kwargs, **local)
        raise


@GENERATORS.register("sd15")
class SD15Generator(DiffusionGenerator):
    id = "sd15"
    defaults = {
        "model": DEFAULT_MODEL,
        "resolution": 768,
        "steps": 25,
        "guidance": 7.5,
        "scheduler": "dpm++",
        "negative_prompt": "",
        "safety_checker": True,
    }

    @classmethod
    def create(cls, options: GeneratorSettings):
        return cls.load(options, pick(options.model, cls.defaults["model"]))

    @classmethod
    def load(cls, options: GeneratorSettings, model: str, model_id: str | None = None):
        """`model_id` names the weights in the settings when the path is not their identity."""
        d = cls.defaults
        dtype = torch_dtype(options.dtype, options.device)
        pipe = load_sd_pipeline(model, dtype, options.device, options.safety_checker, options.model_config)
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
        return cls(pipe, settings, runtime_of(options, dtype))
