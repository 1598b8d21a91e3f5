"""What the diffusers-based generators share: scheduler choice, silenced inner progress bar,
optional torch.compile, the call itself with one seeded torch.Generator per image, the safety
checker's verdict as a failure reason ("nsfw"), and the fp32 re-decode of a VAE overflow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bank.generators.base import Generated, Generator, Request
from dpseg.errors import UserError

SCHEDULERS = ("dpm++", "dpm++-karras", "ddim", "euler", "native")
FP32_DECODE = "fp32-decode"  # the note of an image whose half-precision VAE decode overflowed
COMPILABLE = ("unet", "vae", "channels-last")  # channels-last: a memory layout, not a compile


def set_scheduler(pipe, name: str) -> None:
    """`dpm++` = DPM-Solver++ (2nd order multistep, deterministic); `dpm++-karras` the same on Karras
    sigmas ("DPM++ 2M Karras"); `native` keeps the model's own."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "native":
        return
    dpm = {"algorithm_type": "dpmsolver++", "solver_order": 2}
    table = {
        "dpm++": (DPMSolverMultistepScheduler, dpm),
        "dpm++-karras": (DPMSolverMultistepScheduler, {**dpm, "use_karras_sigmas": True}),
        "ddim": (DDIMScheduler, {}),
        "euler": (EulerDiscreteScheduler, {}),
    }
    if name not in table:
        raise UserError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    cls, kwargs = table[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)


def compile_modules(pipe, modules: Sequence[str], backend: str = "inductor") -> None:
    """torch.compile the denoiser (`unet`, or an SD3 `transformer`) and/or the VAE decoder;
    `channels-last` stores the UNet's and the VAE's conv weights (and so their activations)
    channels-last, which GPU convolutions in half precision run faster. Static shapes: one compile
    per batch size. `backend`: torch.compile's (tests use "eager": the graph capture, no codegen)."""
    unknown = [name for name in modules if name not in COMPILABLE]
    if unknown:
        raise UserError(f"cannot compile {unknown[0]!r}; choose from {', '.join(COMPILABLE)}")
    if "channels-last" in modules:  # before compiling: the compiled graph then assumes this layout
        for attr in ("unet", "vae"):
            module = getattr(pipe, attr, None)
            if module is not None:
                module.to(memory_format=torch.channels_last)
    for name in modules:
        if name == "unet":
            attr = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
            setattr(pipe, attr, torch.compile(getattr(pipe, attr), dynamic=False, backend=backend))
        elif name == "vae":
            pipe.vae.decode = torch.compile(pipe.vae.decode, dynamic=False, backend=backend)


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


def nsfw_failures(flags, count: int) -> list[str | None] | None:
    """The pipeline's `nsfw_content_detected` as per-image failure reasons (None: no checker ran)."""
    if flags is None:
        return None
    return ["nsfw" if bool(f) else None for f in list(flags)[:count]]


def run_safety_checker(pipe, images: torch.Tensor) -> list[bool]:
    """The pipeline's own checker on images in [0, 1] (B, 3, H, W): for the paths on which the
    pipeline does not run it (LayerDiffuse decodes latents itself; the fp32 re-decode)."""
    flagged = pipe.run_safety_checker(images.float() * 2 - 1, images.device, pipe.text_encoder.dtype)[1]
    return [bool(f) for f in flagged]


def vae_decode(vae, latents: torch.Tensor, plain: bool = False) -> torch.Tensor:
    """Latents -> RGB in [-1, 1]. `plain` goes through the class method, not a torch.compile'd
    `vae.decode` attribute (which would recompile for another dtype)."""
    z = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    decode = (lambda x, **kw: type(vae).decode(vae, x, **kw)) if plain else vae.decode
    return decode(z.to(vae.dtype), return_dict=False)[0]


def decode_fp32(vae, latents: torch.Tensor) -> torch.Tensor:
    """The fp16 overflow fix: decode again with the VAE temporarily in fp32; RGB in [0, 1]."""
    dtype = vae.dtype
    try:
        vae.to(torch.float32)
        with torch.no_grad():
            return (vae_decode(vae, latents.float(), plain=True).float() / 2 + 0.5).clamp(0, 1)
    finally:
        vae.to(dtype)


def overflowed(images: torch.Tensor, latents: torch.Tensor | None) -> list[int]:
    """Images that are not finite although their latents are: the VAE decode overflowed (an
    fp16 hazard); NaN latents are the denoiser's failure, left to the retry with a new seed."""
    if latents is None:
        return []
    bad_image = ~torch.isfinite(images.flatten(1)).all(dim=1)
    good_latent = torch.isfinite(latents.flatten(1)).all(dim=1).to(bad_image.device)
    return torch.nonzero(bad_image & good_latent).flatten().tolist()


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
            height=s["resolution"],
            width=s["resolution"],
            num_inference_steps=s["steps"],
            guidance_scale=s["guidance"],
            generator=seeded_generators([r.seed for r in requests]),
            output_type="pt",
        )
        if s.get("negative_prompt"):
            kwargs["negative_prompt"] = [s["negative_prompt"]] * len(requests)
        return kwargs

    def half_vae(self) -> bool:
        vae = getattr(self.pipe, "vae", None)
        return vae is not None and vae.dtype in (torch.float16, torch.bfloat16)

    def generate(self, requests: Sequence[Request]) -> Generated:
        # 1. exactly the bare diffusers call (its own no_grad; an extra inference_mode would make a
        #    compiled UNet recompile between this and a plain pipeline call); with a half-precision
        #    VAE the final latents are kept (a reference, no copy) for a re-decode
        kwargs = self.call_kwargs(requests)
        final: dict[str, torch.Tensor] = {}
        if self.half_vae():

            def keep(pipe, step, timestep, tensors):
                final["latents"] = tensors["latents"]
                return {}

            kwargs.update(callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
        out = self.pipe(**kwargs)
        images = out.images
        # 2. the safety checker's verdict, when one ran: "nsfw", not the "black" it paints
        failures = nsfw_failures(getattr(out, "nsfw_content_detected", None), len(requests))
        # 3. a NaN decode from finite latents: decode those again in fp32 (checked again, if a
        #    checker is loaded) before the build retries the entry with a new seed
        notes: list[str | None] = [None] * len(requests)
        redo = overflowed(images, final.get("latents"))
        if redo:
            fixed = decode_fp32(self.pipe.vae, final["latents"][redo])
            if getattr(self.pipe, "safety_checker", None) is not None:
                flags = run_safety_checker(self.pipe, fixed)
                failures = failures or [None] * len(requests)
                for i, flag in zip(redo, flags, strict=True):
                    failures[i] = "nsfw" if flag else None
            images = images.clone()
            for j, i in enumerate(redo):
                images[i] = fixed[j].to(images.device, images.dtype)
                notes[i] = FP32_DECODE
        return Generated(images=images, failures=failures, notes=notes if redo else None)
