"""`bank build --compile unet,vae,channels-last` on the tiny random SD pipeline (fp32, CPU): the
options reach torch.compile on the right modules, and the images equal the eager ones. Dynamo's
`eager` backend stands in for inductor here (the same graph capture, no C++ code generation,
which takes minutes on the CPU); the GPU bench measures inductor itself."""

from __future__ import annotations

import pytest
import torch

from bank.generators.base import GeneratorSettings, Request, create_generator
from bank.generators.diffusion import compile_modules
from dpseg.errors import UserError

REQUESTS = [Request("a photo of a cat.", 11, "cat", 0), Request("a photo of a dog.", 12, "dog", 1)]


def options(**kw) -> GeneratorSettings:
    return GeneratorSettings(resolution=32, steps=2, dtype="fp32", **kw)


@pytest.fixture(scope="module")
def eager_images():
    return create_generator("tiny-sd", options()).generate(REQUESTS).images


@pytest.mark.slow
def test_compile_option_wires_unet_and_vae_decode_and_keeps_the_images(eager_images, monkeypatch):
    compiled = []
    original = torch.compile

    def recording(target, **kw):
        compiled.append((target, kw))
        return original(target, **{**kw, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", recording)
    gen = create_generator("tiny-sd", options(compile=("unet", "vae", "channels-last")))
    assert gen.runtime["compile"] == ["unet", "vae", "channels-last"]
    targets = [
        type(t).__name__ if not callable(getattr(t, "__func__", None)) else t.__func__.__name__ for t, _ in compiled
    ]
    assert targets == ["UNet2DConditionModel", "decode"] and all(kw["dynamic"] is False for _, kw in compiled)
    assert compiled[1][0].__self__ is gen.pipe.vae  # the VAE's own decode, bound
    assert isinstance(gen.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    conv = gen.pipe.unet._orig_mod.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = gen.generate(REQUESTS).images
    assert images.shape == eager_images.shape
    torch.testing.assert_close(images, eager_images, atol=1e-4, rtol=1e-4)  # fp32: float error only


def test_unknown_module_is_a_user_error():
    with pytest.raises(UserError, match="cannot compile 'text_encoder'; choose from unet, vae, channels-last"):
        compile_modules(object(), ("unet", "text_encoder"))
