"""`layerdiffuse`: SD1.5 + LayerDiffuse ("Transparent Image Layer Diffusion using Latent
Transparency", Zhang & Agrawala 2024), built from the published method for diffusers:

1. Transparent attention (`layer_sd15_transparent_attn.safetensors`): each of the UNet's 32
   attention layers (attn1 and attn2 of every transformer block, in the original LDM order)
   is replaced by a unit whose q/k/v/out projections carry a rank-256 LoRA, plus a "temporal"
   branch (LayerNorm -> Linear -> attention across frames -> Linear) that with one frame
   reduces to its value/output projections. The UNet then samples "transparent latents".
2. Transparent VAE decoder (`layer_sd15_vae_transparent_decoder.safetensors`): a UNet over the
   ordinary VAE decoding (RGB in [0, 1]) with the latent added at 1/8 scale, predicting
   (alpha, RGB foreground); the median over the 8 flips/rotations is taken.
3. The RGBA result is composited on a fixed background (`background`, grey 0.5) for the bank
   image and the prompt encoder; the alpha matte is stored next to it.

The pipeline is called for latents (it then skips its safety checker), so the checker, when
loaded, is run here on the composited image; an fp16 decode that overflows is redone in fp32.
Defaults are the reference's SD1.5 setting (512 px, DPM++ 2M Karras, CFG 7, 20 steps), not
sd15's: the LoRA was trained and published for that setting, and a bank of it should be the
transparent images the method makes, not a variant at the paper's 768 px.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bank.generators.base import GENERATORS, Generated, GeneratorSettings, Request, pick, runtime_of, torch_dtype
from bank.generators.diffusion import (
    FP32_DECODE,
    DiffusionGenerator,
    compile_modules,
    decode_fp32,
    overflowed,
    quiet_loading,
    run_safety_checker,
    set_scheduler,
    vae_decode,
)
from bank.generators.sd15 import DEFAULT_MODEL, load_sd_pipeline
from dpseg.errors import UserError

LAYER_REPO = "LayerDiffusion/layerdiffusion-v1"
ATTN_FILE = "layer_sd15_transparent_attn.safetensors"
DECODER_FILE = "layer_sd15_vae_transparent_decoder.safetensors"

# The 16 transformer blocks of SD1.5's UNet in LDM order (input 1,2,4,5,7,8; output 3..11; middle),
# each contributing attn1 (self) then attn2 (cross): units 0..31 of the LoRA file.
TRANSFORMER_BLOCKS = (
    [f"down_blocks.{b}.attentions.{i}" for b in range(3) for i in range(2)]
    + [f"up_blocks.{b}.attentions.{i}" for b in range(1, 4) for i in range(3)]
    + ["mid_block.attentions.0"]
)
ATTENTION_LAYERS = [f"{blk}.transformer_blocks.0.{a}" for blk in TRANSFORMER_BLOCKS for a in ("attn1", "attn2")]


class LowRank(nn.Module):
    """W + up @ down, applied with the wrapped layer's own weight and bias."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        self._base = [base]  # not a submodule: its weights stay the UNet's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._base[0]
        return F.linear(x, base.weight + self.up.weight @ self.down.weight, base.bias)


class TransparentAttention(nn.Module):
    """A diffusers attention processor (and module: its weights load from the LoRA file)."""

    def __init__(self, attn, rank: int = 256):
        super().__init__()
        width = attn.to_out[0].out_features
        self.to_q_lora = nn.ModuleList([LowRank(attn.to_q, rank)])
        self.to_k_lora = nn.ModuleList([LowRank(attn.to_k, rank)])
        self.to_v_lora = nn.ModuleList([LowRank(attn.to_v, rank)])
        self.to_out_lora = nn.ModuleList([LowRank(attn.to_out[0], rank)])
        self.temporal_n = nn.LayerNorm(width, eps=1e-6)
        for name in ("temporal_i", "temporal_q", "temporal_k", "temporal_v", "temporal_o"):
            setattr(self, name, nn.Linear(width, width))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return self.forward(attn, hidden_states, encoder_hidden_states)

    def forward(self, attn, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = h if context is None else context
        b, n, _ = h.shape
        q, k, v = self.to_q_lora[0](h), self.to_k_lora[0](context), self.to_v_lora[0](context)
        heads = attn.heads
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        x = h + attn.to_out[1](self.to_out_lora[0](o))
        # the temporal branch: attention across frames; with one frame the softmax weight is 1,
        # so it is the value projection of the normalised, projected features (q and k unused)
        x = x + self.temporal_o(self.temporal_v(self.temporal_i(self.temporal_n(x))))
        return x - h  # the transformer block adds its own residual (h)


def patch_unet(unet, state_dict: dict[str, torch.Tensor] | None = None, rank: int = 256) -> nn.ModuleList:
    """Installs the 32 units on `unet` and loads `state_dict` (keys hookers.layers.<i>.<...>)."""
    units = nn.ModuleList()
    for name in ATTENTION_LAYERS:
        attn = unet.get_submodule(name)
        unit = TransparentAttention(attn, rank).to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)
        attn.set_processor(unit)
        units.append(unit)
    if state_dict is not None:
        holder = nn.Module()
        holder.hookers = nn.Module()
        holder.hookers.layers = units
        try:
            holder.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise UserError(f"{ATTN_FILE} does not fit this UNet (is it SD1.5?): {str(err).splitlines()[0]}") from None
    return units


class TransparentDecoder(nn.Module):
    """(decoded RGB in [0, 1], latent) -> (alpha, foreground RGB) logits-free in [0, 1] after clip."""

    def __init__(
        self,
        block_out_channels=(32, 32, 64, 128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 4,
        attention_head_dim: int = 8,
        latent_channels: int = 4,
    ):
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block

        super().__init__()
        ch = list(block_out_channels)
        levels = len(ch)
        attn_from = levels - 3  # the three lowest-resolution levels have self-attention
        common = dict(
            temb_channels=None,
            resnet_eps=1e-5,
            resnet_act_fn="silu",
            resnet_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,
            dropout=0.0,
        )
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.latent_conv_in = nn.Conv2d(latent_channels, ch[2], 1)
        self.down_blocks = nn.ModuleList(
            get_down_block(
                "AttnDownBlock2D" if i >= attn_from else "DownBlock2D",
                num_layers=layers_per_block,
                in_channels=ch[max(i - 1, 0)],
                out_channels=ch[i],
                add_downsample=i < levels - 1,
                downsample_padding=1,
                downsample_type="conv",
                **common,
            )
            for i in range(levels)
        )
        self.mid_block = UNetMidBlock2D(
            in_channels=ch[-1],
            temb_channels=None,
            resnet_eps=1e-5,
            resnet_act_fn="silu",
            resnet_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,
            add_attention=True,
        )
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList(
            get_up_block(
                "AttnUpBlock2D" if i < 3 else "UpBlock2D",
                num_layers=layers_per_block + 1,
                in_channels=rev[min(i + 1, levels - 1)],
                out_channels=rev[i],
                prev_output_channel=rev[max(i - 1, 0)],
                add_upsample=i < levels - 1,
                upsample_type="conv",
                **common,
            )
            for i in range(levels)
        )
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], 4, 3, padding=1)

    def forward(self, pixels: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(pixels)
        skips = (x,)
        for i, block in enumerate(self.down_blocks):
            if i == 3:  # 1/8 resolution: where the VAE latent lives
                x = x + self.latent_conv_in(latent)
            x, res = block(hidden_states=x, temb=None)
            skips += res
        x = self.mid_block(x, None)
        for block in self.up_blocks:
            res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            x = block(x, res, None)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    @torch.no_grad()
    def decode(self, pixels: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Median over the 8 flips/rotations of the (alpha, RGB) estimate, clipped to [0, 1]."""
        outs = []
        for flip in (False, True):
            for turns in range(4):
                p, z = (torch.flip(t, dims=(3,)) if flip else t for t in (pixels, latent))
                p, z = (torch.rot90(t, k=turns, dims=(2, 3)) for t in (p, z))
                y = torch.rot90(self(p, z).clip(0, 1), k=-turns, dims=(2, 3))
                outs.append(torch.flip(y, dims=(3,)) if flip else y)
        return torch.stack(outs).median(dim=0).values


def _layer_file(source: str, name: str) -> str:
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / name).is_file():
            raise UserError(f"{path} has no {name}; download it from the {LAYER_REPO} hub repository")
        return str(path / name)
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(source, name)
    except Exception as err:
        raise UserError(
            f"could not get {name} from {source!r} ({type(err).__name__}); pass --layer-weights DIR "
            f"with {ATTN_FILE} and {DECODER_FILE}"
        ) from None


@GENERATORS.register("layerdiffuse")
class LayerDiffuseGenerator(DiffusionGenerator):
    id = "layerdiffuse"
    makes_alpha = True
    defaults = {
        "model": DEFAULT_MODEL,
        "layer_weights": LAYER_REPO,
        "resolution": 512,
        "steps": 20,
        "guidance": 7.0,
        "scheduler": "dpm++-karras",
        "negative_prompt": "",
        "safety_checker": False,
        "background": 0.5,
        "rank": 256,
    }

    def __init__(self, pipe, decoder: TransparentDecoder, settings, runtime):
        super().__init__(pipe, settings, runtime)
        self.decoder = decoder

    @classmethod
    def create(cls, options: GeneratorSettings):
        from safetensors.torch import load_file

        d = cls.defaults
        extra = options.extra or {}
        if pick(options.resolution, d["resolution"]) % 64:
            raise UserError(
                "layerdiffuse needs --resolution a multiple of 64 (its transparent decoder halves the size 6 times)"
            )
        model = pick(options.model, d["model"])
        layer = pick(extra.get("layer_weights"), d["layer_weights"])
        dtype = torch_dtype(options.dtype, options.device)
        quiet_loading()
        pipe = load_sd_pipeline(model, dtype, options.device, pick(options.safety_checker, False), options.model_config)
        rank = int(extra.get("rank", d["rank"]))
        patch_unet(pipe.unet, load_file(_layer_file(layer, ATTN_FILE)), rank)
        decoder = TransparentDecoder(**extra.get("decoder_config", {}))
        try:
            decoder.load_state_dict(load_file(_layer_file(layer, DECODER_FILE)), strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise UserError(f"{DECODER_FILE} does not match the transparent decoder: {first}") from None
        decoder.to(device=options.device, dtype=dtype).eval()
        settings = {
            "model": extra.get("model_id", model),
            "layer_weights": extra.get("layer_id", layer),
            "resolution": pick(options.resolution, d["resolution"]),
            "steps": pick(options.steps, d["steps"]),
            "guidance": float(pick(options.guidance, d["guidance"])),
            "scheduler": pick(options.scheduler, d["scheduler"]),
            "negative_prompt": pick(options.negative_prompt, d["negative_prompt"]),
            "safety_checker": getattr(pipe, "safety_checker", None) is not None,
            "background": float(extra.get("background", d["background"])),
        }
        set_scheduler(pipe, settings["scheduler"])
        compile_modules(pipe, options.compile)
        return cls(pipe, decoder, settings, runtime_of(options, dtype))

    @torch.no_grad()
    def generate(self, requests: Sequence[Request]) -> Generated:
        # 1. transparent latents from the patched UNet (the pipeline stops before its VAE and checker)
        kwargs = self.call_kwargs(requests)
        kwargs["output_type"] = "latent"
        latents = self.pipe(**kwargs).images
        # 2. the ordinary VAE decode; an fp16 overflow (NaN from finite latents) is decoded again in fp32
        vae = self.pipe.vae
        pixels = (vae_decode(vae, latents) * 0.5 + 0.5).clamp(0, 1)
        notes: list[str | None] = [None] * len(requests)
        redo = overflowed(pixels, latents)
        if redo:
            pixels = pixels.clone()
            pixels[redo] = decode_fp32(vae, latents[redo]).to(pixels.dtype)
            for i in redo:
                notes[i] = FP32_DECODE
        # 3. the transparent decoder, one image at a time (its 8-fold median is memory hungry)
        z = latents / vae.config.scaling_factor
        width = self.decoder.conv_in.weight.dtype
        rgb, alpha = [], []
        for i in range(len(requests)):
            y = self.decoder.decode(pixels[i : i + 1].to(width), z[i : i + 1].to(width))
            a, fg = y[:, :1].float(), y[:, 1:].float()
            rgb.append(fg * a + self.settings["background"] * (1 - a))
            alpha.append(a)
        images = torch.cat(rgb)
        # 4. the safety checker on what is stored (the pipeline skipped it for latents)
        failures = None
        if getattr(self.pipe, "safety_checker", None) is not None:
            failures = ["nsfw" if flag else None for flag in run_safety_checker(self.pipe, images)]
        return Generated(images=images, alpha=torch.cat(alpha), failures=failures, notes=notes if redo else None)
