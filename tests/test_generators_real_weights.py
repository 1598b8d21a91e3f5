"""The paths a user with real weights takes, on tiny models saved locally (no network): a
single-file SD1.5 checkpoint with a local config folder, the safety checker (refused where it
cannot run, its verdict kept as "nsfw"), the fp32 re-decode of an fp16 VAE overflow,
LayerDiffuse's reference defaults, safetensors-only loading with the fp16 variant, sd3 guards."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bank.generators import GeneratorSettings, Request, create_generator
from bank.generators.layerdiffuse import ATTN_FILE, DECODER_FILE, TransparentDecoder, patch_unet
from bank.generators.sd15 import SD15Generator, fp16_variant
from bank.generators.tiny_sd import ensure_tiny_sd
from dpseg.errors import UserError

# --- the original (LDM) single-file layout of a diffusers SD1.5 pipeline, written from the
# --- LDM module names (diffusers converts one way only); the round trip below checks it
RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    module, leaf = rest.rsplit(".", 1)
    return f"{RESNET[module]}.{leaf}"


def unet_key(key: str, up_has_attention) -> str:
    """SD1.5 topology (2 layers per level): down level i, layer j -> input block 3i+j+1."""
    module, leaf = key.rsplit(".", 1)
    if module in UNET_TOP:
        return f"{UNET_TOP[module]}.{leaf}"
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        block = f"input_blocks.{3 * i + j + 1}" if kind == "down" else f"output_blocks.{3 * i + j}"
        return f"{block}.0.{_resnet(rest)}" if part == "resnets" else f"{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{3 * (int(m.group(1)) + 1)}.0.op.{m.group(2)}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        i = int(m.group(1))
        return f"output_blocks.{3 * i + 2}.{2 if up_has_attention(i) else 1}.{m.group(2)}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        if m.group(1) == "attentions":
            return f"middle_block.1.{m.group(3)}"
        return f"middle_block.{2 * int(m.group(2))}.{_resnet(m.group(3))}"
    raise KeyError(key)


def vae_key(key: str, levels: int) -> str:
    coder, rest = key.split(".", 1)
    if coder in ("quant_conv", "post_quant_conv"):
        return key
    rest = rest.replace("conv_norm_out", "norm_out")
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.*)", rest):
        down = m.group(1) == "down"
        level = int(m.group(2)) if down else levels - 1 - int(m.group(2))  # LDM numbers up levels bottom-up
        if m.group(4) is not None:
            inner = f"block.{m.group(4)}.{m.group(5).replace('conv_shortcut', 'nin_shortcut')}"
        else:
            inner = f"{'downsample' if down else 'upsample'}.{m.group(5)}"
        return f"{coder}.{'down' if down else 'up'}.{level}.{inner}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        return f"{coder}.mid.block_{int(m.group(1)) + 1}.{m.group(2).replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)\.(weight|bias)", rest):
        return f"{coder}.mid.attn_1.{VAE_ATTN[m.group(1)]}.{m.group(2)}"
    return f"{coder}.{rest}"


def original_layout(pipe) -> dict[str, torch.Tensor]:
    out = {}
    up_types = pipe.unet.config.up_block_types
    for k, v in pipe.unet.state_dict().items():
        out["model.diffusion_model." + unet_key(k, lambda i: "CrossAttn" in up_types[i])] = v
    levels = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        new = vae_key(k, levels)
        if ".mid.attn_1." in new and new.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the LDM VAE's attention projections are 1x1 convolutions
        out["first_stage_model." + new] = v
    for k, v in pipe.text_encoder.state_dict().items():  # SD1.5 files hold CLIPTextModel under `text_model.`
        out["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return {k: v.contiguous() for k, v in out.items()}


def tiny_safety_checker(flag_everything: bool):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(vision_config=vision, text_config=dict(hidden_size=32), projection_dim=16)
    ).eval()
    with torch.no_grad():  # cosine - threshold > 0 flags: -2 flags every image, +2 none
        checker.concept_embeds_weights.fill_(-2.0 if flag_everything else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, extractor


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """tiny.safetensors (original layout) + a config folder holding no UNet/VAE/text weights,
    only configs, tokenizer, scheduler and a safety checker that flags every image."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("single")
    source = ensure_tiny_sd()
    pipe = StableDiffusionPipeline.from_pretrained(source)
    save_file(original_layout(pipe), root / "tiny.safetensors")
    config = root / "config"
    shutil.copytree(source, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    checker, extractor = tiny_safety_checker(flag_everything=True)
    checker.save_pretrained(config / "safety_checker")
    extractor.save_pretrained(config / "feature_extractor")
    return {"file": root / "tiny.safetensors", "config": config, "reference": pipe}


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Offline and nothing cached: any fetch from the hub would fail."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_single_file_loads_offline_from_a_local_config_folder(single_file, empty_hub_cache):
    options = GeneratorSettings(
        model=str(single_file["file"]), model_config=str(single_file["config"]), resolution=32, steps=2
    )
    gen = create_generator("sd15", options)
    ref = single_file["reference"]
    for name in ("unet", "vae", "text_encoder"):  # the round trip through the original layout is exact
        ours, theirs = getattr(gen.pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert gen.settings["safety_checker"] is False  # as shipped: a single file holds no checker
    tiny = create_generator("tiny-sd", GeneratorSettings(resolution=32, steps=2))
    request = [Request("a photo of a cat.", 7)]
    torch.testing.assert_close(gen.generate(request).images, tiny.generate(request).images, atol=1e-5, rtol=0)
    assert not any(empty_hub_cache.rglob("*"))  # nothing was fetched or cached
    with pytest.raises(UserError, match="--model-config DIR"):
        create_generator("sd15", GeneratorSettings(model=str(single_file["file"])))
    with pytest.raises(UserError, match="not a diffusers folder"):
        create_generator(
            "sd15", GeneratorSettings(model=str(single_file["file"]), model_config=str(empty_hub_cache.parent))
        )


def test_safety_checker_verdict_is_nsfw_and_never_silently_off(single_file, empty_hub_cache, tmp_path):
    from bank.build import BuildSettings, build_bank
    from bank.encode import PromptEncoder
    from bank.merge import read_manifest
    from bank.store import BankStore

    options = GeneratorSettings(
        model=str(single_file["file"]),
        model_config=str(single_file["config"]),
        resolution=32,
        steps=2,
        safety_checker=True,
    )
    gen = create_generator("sd15", options)  # the single file gets its checker from the config folder
    assert gen.settings["safety_checker"] is True
    out = gen.generate([Request("a cat", 1), Request("a dog", 2)])
    assert out.failures == ["nsfw", "nsfw"]
    assert out.images.abs().max() == 0  # what the pipeline returns for them: black, which is not the reason
    # the reason reaches the bank; a flagged entry is final (no retry with another seed)
    names = tmp_path / "names.txt"
    names.write_text("cat\n")
    build_bank(
        BuildSettings(
            out=tmp_path / "bank", generator="sd15", vocab=[str(names)], encoder="tiny", templates=1, progress=False
        ),
        generator=gen,
        encoder=PromptEncoder("tiny", None),
    )
    table, _ = read_manifest(BankStore(tmp_path / "bank"))
    rows = table.to_pylist()
    assert [(r["status"], r["reason"]) for r in rows] == [("failed", "nsfw")]
    with torch.no_grad():
        gen.pipe.safety_checker.concept_embeds_weights.fill_(2.0)
    assert gen.generate([Request("a cat", 1)]).failures == [None]
    # asked for where none can run: one line, never a silent "off"
    with pytest.raises(UserError, match="ships no safety checker"):
        create_generator("sd15", GeneratorSettings(model=str(ensure_tiny_sd()), safety_checker=True))
    without = tmp_path / "config-without-checker"
    shutil.copytree(
        single_file["config"], without, ignore=shutil.ignore_patterns("safety_checker", "feature_extractor")
    )
    with pytest.raises(UserError, match="no safety checker in"):
        create_generator(
            "sd15", GeneratorSettings(model=str(single_file["file"]), model_config=str(without), safety_checker=True)
        )
    for spec in ("sd3", "sd15-random"):
        with pytest.raises(UserError, match="no safety checker"):
            create_generator(spec, GeneratorSettings(model=str(tmp_path / "none"), safety_checker=True))


def _layer_files(folder: Path, unet) -> dict:
    torch.manual_seed(0)
    units = patch_unet(unet, None, rank=4)
    save_file({f"hookers.layers.{k}": v.contiguous() for k, v in units.state_dict().items()}, folder / ATTN_FILE)
    small = {"block_out_channels": (8, 8, 8, 8, 16, 16, 16), "norm_num_groups": 4}
    decoder = TransparentDecoder(**small)
    torch.nn.init.constant_(decoder.conv_out.bias, 0.5)
    save_file(decoder.state_dict(), folder / DECODER_FILE)
    return {"layer_weights": str(folder), "rank": 4, "decoder_config": small}


def test_layerdiffuse_reference_defaults_and_explicit_safety_checker(single_file, empty_hub_cache, tmp_path):
    from diffusers import StableDiffusionPipeline

    extra = _layer_files(tmp_path, StableDiffusionPipeline.from_pretrained(ensure_tiny_sd()).unet)
    gen = create_generator("layerdiffuse", GeneratorSettings(model=str(ensure_tiny_sd()), extra=extra))
    s, config = gen.settings, gen.pipe.scheduler.config
    assert (s["resolution"], s["steps"], s["guidance"], s["scheduler"]) == (512, 20, 7.0, "dpm++-karras")
    assert type(gen.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert config.use_karras_sigmas and config.algorithm_type == "dpmsolver++" and config.solver_order == 2
    assert (SD15Generator.defaults["resolution"], SD15Generator.defaults["scheduler"]) == (768, "dpm++")  # the paper's
    # the pipeline is called for latents and skips its checker: layerdiffuse runs it on the composite
    options = GeneratorSettings(
        model=str(single_file["file"]),
        model_config=str(single_file["config"]),
        resolution=64,
        steps=2,
        safety_checker=True,
        extra=extra,
    )
    gen = create_generator("layerdiffuse", options)
    assert gen.settings["safety_checker"] is True
    out = gen.generate([Request("a cat", 1)])
    assert out.failures == ["nsfw"] and out.alpha.shape == (1, 1, 64, 64)


def test_fp16_vae_overflow_is_decoded_again_in_fp32():
    gen = create_generator("tiny-sd", GeneratorSettings(resolution=32, steps=2, dtype="fp16"))
    vae = gen.pipe.vae
    with torch.no_grad():  # activations beyond fp16's 65504: inf, then NaN after the first GroupNorm
        vae.decoder.conv_in.weight.mul_(1e5)
    requests = [Request("a cat", 1)]
    out = gen.generate(requests)
    assert out.notes == ["fp32-decode"] and torch.isfinite(out.images).all()
    assert vae.dtype == torch.float16  # put back after the re-decode
    # independently: the same latents, decoded by an fp32 copy of the VAE
    kwargs = gen.call_kwargs(requests)
    kwargs["output_type"] = "latent"
    latents = gen.pipe(**kwargs).images
    with torch.no_grad():
        half = vae.decode(latents / vae.config.scaling_factor).sample
        full = type(vae).from_config(vae.config)
        full.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
        expect = (full.decode(latents.float() / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert not torch.isfinite(half).all()  # the overflow is real
    torch.testing.assert_close(out.images.float(), expect, atol=2e-3, rtol=0)  # stored back as fp16


def test_safetensors_only_and_the_fp16_variant(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_sd())
    assert fp16_variant(str(ensure_tiny_sd()), torch.float16) is None  # no fp16 files there
    assert fp16_variant("owner/name", torch.float16) == "fp16" and fp16_variant("owner/name", torch.float32) is None
    pipe.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    assert fp16_variant(str(tmp_path / "fp16"), torch.float16) == "fp16"
    gen = create_generator("sd15", GeneratorSettings(model=str(tmp_path / "fp16"), dtype="fp16"))
    assert gen.pipe.unet.dtype == torch.float16
    pipe.save_pretrained(tmp_path / "pickled")  # then the UNet's weights as a pickle (.bin) only
    unet = tmp_path / "pickled" / "unet"
    torch.save(pipe.unet.state_dict(), unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="could not load Stable Diffusion weights"):
        create_generator("sd15", GeneratorSettings(model=str(tmp_path / "pickled")))


def test_sd3_guards(tmp_path):
    with pytest.raises(UserError, match="does not exist"):  # options.extra = None is fine
        create_generator("sd3", GeneratorSettings(model=str(tmp_path / "nope"), extra=None))
    (tmp_path / "sd3.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="not single files"):
        create_generator("sd3", GeneratorSettings(model=str(tmp_path / "sd3.safetensors")))
