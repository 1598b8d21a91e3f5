"""Component configs of the SD1.5 architecture (the real one and a tiny one of the same
topology), so pipelines can be built offline with random weights."""

from __future__ import annotations

SD15_SCHEDULER = dict(  # the scheduler_config.json that SD1.5 ships (PNDM)
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    prediction_type="epsilon",
)

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
)

SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    norm_num_groups=32,
    act_fn="silu",
    scaling_factor=0.18215,
)

SD15_TEXT = dict(  # CLIP ViT-L/14 text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

# Same topology (4 UNet levels, 2 layers, cross-attention in 3 down / 3 up levels, VAE factor 8),
# tiny widths: fast on a CPU and structurally what LayerDiffuse's attention patch expects.
TINY_UNET = dict(
    SD15_UNET,
    sample_size=8,
    block_out_channels=(16, 32, 32, 32),
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
)
TINY_VAE = dict(SD15_VAE, sample_size=64, block_out_channels=(8, 8, 16, 16), norm_num_groups=4, layers_per_block=1)
TINY_TEXT = dict(
    SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
)


def build_sd_pipeline(unet_cfg: dict, vae_cfg: dict, text_cfg: dict, seed: int = 0, device: str = "cpu", dtype=None):
    """A StableDiffusionPipeline with random weights (seeded), built on `device`, no downloads."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bank.generators.diffusion import quiet_loading
    from bank.tokenizer import clip_tokenizer

    quiet_loading()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    return pipe
