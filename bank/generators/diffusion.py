"""What the diffusers-based generators share: scheduler choice, silenced inner progress bar,
optional torch.compile, and the call itself with one seeded torch.Generator per image."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from bank.generators.base import Generated, Generator, Request
from dpseg.errors import UserError

SCHEDULERS = ("dpm++", "ddim", "euler", "native")
COMPILABLE = ("unet", "vae")


def set_scheduler(pipe, name: str) -> None:
    """`dpm++` = DPM-Solver++ (2nd order multistep, deterministic); `native` keeps the model's own."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "native":
        return
    table = {"dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
             "ddim": (DDIMScheduler, {}), "euler": (EulerDiscreteScheduler, {})}
    if name not in table:
        raise UserError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    cls, kwargs = table[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)


def compile_modules(pipe, modules: Sequence[str]) -> None:
    """torch.compile the denoiser (`unet`, or an SD3 `transformer`) and/or the VAE decoder.
    Static shapes: one compile per batch size."""
    for name in modules:
        if name not in COMPILABLE:
            raise UserError(f"cannot compile {name!r}; choose from {', '.join(COMPILABLE)}")
        if name == "unet":
            attr = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
            setattr(pipe, attr, torch.compile(getattr(pipe, attr), dynamic=False))
        else:
            pipe.vae.decode = torch.compile(pipe.vae.decode, dynamic=False)


def quiet_loading() -> None:
    """No loading bars or deprecation chatter from diffusers/transformers inside our own bars."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: the initial noise is drawn on the CPU, so it depends only on
    the seed (not on the batch, the rank or the GPU model) and is then moved to the device."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


class DiffusionGenerator(Generator):
    """A diffusers text-to-image pipeline called with a batch of prompts."""

    def __init__(self, pipe, settings: dict[str, Any], runtime: dict[str, Any]):
        super().__init__(settings, runtime)
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)

    def call_kwargs(self, requests: Sequence[Request]) -> dict[str, Any]:
        s = self.settings
        kwargs = dict(
            prompt=[r.prompt for r in requests],
            height=s["resolution"], width=s["resolution"],
            num_inference_steps=s["steps"], guidance_scale=s["guidance"],
            generator=seeded_generators([r.seed for r in requests]),
            output_type="pt",
        )
        if s.get("negative_prompt"):
            kwargs["negative_prompt"] = [s["negative_prompt"]] * len(requests)
        return kwargs

    def generate(self, requests: Sequence[Request]) -> Generated:
        # exactly the bare diffusers call (its own no_grad; an extra inference_mode would make a
        # compiled UNet recompile between this and a plain pipeline call)
        out = self.pipe(**self.call_kwargs(requests))
        return Generated(images=out.images)
