"""Generators: the offline tokenizer, the loaders (sd15 path used by tiny-sd, sd3 without T5),
the real SD1.5 architecture of sd15-random, LayerDiffuse's structure, procedural, errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("DPSEG_CACHE", str(Path(tempfile.gettempdir()) / "dpseg-test-cache"))

from bank.generators import GeneratorSettings, Request, create_generator  # noqa: E402
from bank.generators.layerdiffuse import (  # noqa: E402
    ATTENTION_LAYERS,
    ATTN_FILE,
    DECODER_FILE,
    TransparentAttention,
    TransparentDecoder,
    patch_unet,
)
from bank.generators.sd_configs import SD15_TEXT, SD15_UNET, SD15_VAE  # noqa: E402
from bank.generators.tiny_sd import ensure_tiny_sd  # noqa: E402
from dpseg.errors import UserError  # noqa: E402


def test_offline_clip_tokenizer_matches_open_clip():
    import open_clip

    from bank.tokenizer import clip_tokenizer

    ours, theirs = clip_tokenizer(), open_clip.get_tokenizer("ViT-B-32")
    for text in ["a bad photo of a building.", "a photo of the large traffic light!", "Ünïcode façade, 3D-printed"]:
        ids = ours(text).input_ids
        assert ids == theirs([text])[0].tolist()[: len(ids)]
    assert len(ours) == 49408


def test_sd15_random_is_the_real_sd15_architecture():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        models = (
            UNet2DConditionModel(**SD15_UNET),
            AutoencoderKL(**SD15_VAE),
            CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        )
        counts = [sum(p.numel() for p in m.parameters()) for m in models]
    assert counts == [859_520_964, 83_653_863, 123_060_480]  # SD1.5's UNet, VAE and CLIP ViT-L/14 text tower


def test_tiny_sd_goes_through_the_sd15_loader_and_seeds_per_image():
    gen = create_generator("tiny-sd", GeneratorSettings(resolution=32, steps=2))
    assert type(gen.pipe).__name__ == "StableDiffusionPipeline" and gen.settings["model"] == "tiny-sd-v1"
    a = gen.generate([Request("a photo of a cat.", 11), Request("a photo of a dog.", 12)]).images
    b = gen.generate([Request("a photo of a dog.", 12)]).images
    assert a.shape == (2, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a[1], b[0], atol=1e-4, rtol=0)
    c = gen.generate([Request("a photo of a dog.", 13)]).images
    assert (c[0] - b[0]).abs().max() > 1e-3
    # the same directory through the sd15 id: same loader, same pipeline class
    sd = create_generator("sd15", GeneratorSettings(model=str(ensure_tiny_sd()), resolution=32, steps=2))
    torch.testing.assert_close(sd.generate([Request("a photo of a dog.", 12)]).images, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "model,needle",
    [
        ("{tmp}/missing.safetensors", "does not exist"),
        ("{tmp}", "not a diffusers pipeline directory"),
        ("./nowhere/at/all", "neither a file, a directory nor a hub id"),
    ],
)
def test_sd15_loader_errors(tmp_path, model, needle):
    with pytest.raises(UserError, match=needle):
        create_generator("sd15", GeneratorSettings(model=model.format(tmp=tmp_path)))


def _tiny_sd3(path: Path) -> Path:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from bank.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    text = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=64,
            caption_projection_dim=16,
            pooled_projection_dim=64,
            out_channels=4,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKL(
            block_out_channels=(8, 8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=32,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        ),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(path)
    return path


def test_sd3_loader_without_t5(tmp_path):
    model = _tiny_sd3(tmp_path / "sd3")
    gen = create_generator("sd3", GeneratorSettings(model=str(model), t5=False, resolution=32, steps=2))
    assert gen.pipe.text_encoder_3 is None and gen.settings["t5"] is False
    out = gen.generate([Request("a cat", 1), Request("a dog", 2)]).images
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(gen.generate([Request("a dog", 2)]).images[0], out[1], atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="flow-matching"):
        create_generator("sd3", GeneratorSettings(model=str(model), t5=False, scheduler="dpm++"))
    with pytest.raises(UserError, match="does not exist"):
        create_generator("sd3", GeneratorSettings(model=str(tmp_path / "nope")))


def test_layerdiffuse_decoder_has_the_published_structure():
    with torch.device("meta"):
        decoder = TransparentDecoder()
    keys = decoder.state_dict()
    assert sum(p.numel() for p in decoder.parameters()) == 104_104_804
    assert keys["latent_conv_in.weight"].shape == (64, 4, 1, 1) and keys["conv_out.weight"].shape == (4, 32, 3, 3)
    assert len(decoder.down_blocks) == 7 and len(decoder.up_blocks) == 7
    assert "down_blocks.6.attentions.1.to_q.weight" in keys and "up_blocks.0.attentions.2.to_q.weight" in keys
    assert "down_blocks.3.attentions.0.to_q.weight" not in keys  # attention only at the 3 coarsest levels


def test_transparent_attention_with_zero_deltas_is_the_plain_attention():
    gen = create_generator("tiny-sd", GeneratorSettings(resolution=32, steps=2))
    attn = gen.pipe.unet.get_submodule(ATTENTION_LAYERS[1])  # a cross-attention layer
    unit = TransparentAttention(attn, rank=4)
    for lora in (unit.to_q_lora, unit.to_k_lora, unit.to_v_lora, unit.to_out_lora):
        torch.nn.init.zeros_(lora[0].up.weight)
    torch.nn.init.zeros_(unit.temporal_o.weight)
    torch.nn.init.zeros_(unit.temporal_o.bias)
    h, ctx = torch.randn(2, 16, attn.to_q.in_features), torch.randn(2, 77, attn.to_k.in_features)
    with torch.no_grad():
        torch.testing.assert_close(unit(attn, h, ctx), attn(h, ctx), atol=1e-5, rtol=1e-4)


def test_layerdiffuse_generates_rgba_and_the_bank_keeps_alpha(tmp_path):
    from safetensors.torch import save_file

    from bank.build import BuildSettings, build_bank
    from bank.encode import PromptEncoder
    from bank.store import ShardReader

    base = create_generator("tiny-sd", GeneratorSettings(resolution=32, steps=2))
    torch.manual_seed(0)
    units = patch_unet(base.pipe.unet, None, rank=4)
    save_file({f"hookers.layers.{k}": v.contiguous() for k, v in units.state_dict().items()}, tmp_path / ATTN_FILE)
    assert len(units) == 32
    small = {"block_out_channels": (8, 8, 8, 8, 16, 16, 16), "norm_num_groups": 4}
    decoder = TransparentDecoder(**small)
    torch.nn.init.normal_(decoder.conv_out.weight, std=0.5)  # random but not saturated: alpha varies
    torch.nn.init.constant_(decoder.conv_out.bias, 0.5)
    save_file(decoder.state_dict(), tmp_path / DECODER_FILE)
    options = GeneratorSettings(
        model=str(ensure_tiny_sd()),
        resolution=64,
        steps=2,
        extra={"layer_weights": str(tmp_path), "rank": 4, "decoder_config": small},
    )
    gen = create_generator("layerdiffuse", options)
    out = gen.generate([Request("a photo of a cat.", 1), Request("a photo of a dog.", 2)])
    assert out.images.shape == (2, 3, 64, 64) and out.alpha.shape == (2, 1, 64, 64)
    assert 0 <= out.alpha.min() and out.alpha.max() <= 1
    names = tmp_path / "names.txt"
    names.write_text("cat\n")
    torch.manual_seed(0)
    build_bank(
        BuildSettings(
            out=tmp_path / "bank",
            generator="layerdiffuse",
            vocab=[str(names)],
            encoder="tiny",
            templates=2,
            progress=False,
        ),
        generator=gen,
        encoder=PromptEncoder("tiny", None),
    )
    shard = sorted((tmp_path / "bank").glob("images-*.tar"))[0]
    with ShardReader(shard) as reader:
        assert all({"png", "alpha.png", "json"} <= set(files) for files in reader.members.values()), reader.members
    with pytest.raises(UserError, match=ATTN_FILE):
        missing = {"layer_weights": str(tmp_path / "none")}
        create_generator("layerdiffuse", GeneratorSettings(model=str(ensure_tiny_sd()), extra=missing))
    with pytest.raises(UserError, match="multiple of 64"):
        create_generator(
            "layerdiffuse", GeneratorSettings(model=str(ensure_tiny_sd()), resolution=32, extra=options.extra)
        )


def test_procedural_renders_the_shapes_benchmark():
    from dpseg.data.shapes import SHAPES_CATEGORIES, render_prompt_image

    gen = create_generator("procedural", GeneratorSettings(resolution=32))
    cat = SHAPES_CATEGORIES[0]
    out = gen.generate([Request(f"a photo of a {cat}.", 5, cat, "a photo of a {}.")]).images
    expect = render_prompt_image(cat, "a photo of a {}.", 32, 5)
    np.testing.assert_array_equal((out[0].permute(1, 2, 0) * 255).round().byte().numpy(), expect)


def test_unknown_and_derived_generator_ids():
    with pytest.raises(UserError, match="unknown generator 'sd99'.*procedural.*tiny-sd"):
        create_generator("sd99")
    with pytest.raises(UserError, match="bank derive"):
        create_generator("noise:0.2")
