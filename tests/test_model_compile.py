"""`DPSeg.compile_decoder`: the one-pass decoder under torch.compile gives the eager logits (fp32,
CPU), leaves the state dict alone, and training and chunked decoding keep the eager modules.
Dynamo's `eager` backend stands in for inductor (the same graph capture, no C++ code generation,
which takes minutes here); `dpseg bench model --compile-decoder` measures inductor itself."""

from __future__ import annotations

import torch

from dpseg.model import DPSegConfig, build_dpseg
from dpseg.model.summary import random_prompts


def test_compiled_decoder_gives_the_eager_logits_and_keeps_the_state_dict():
    torch.manual_seed(0)
    model = build_dpseg(DPSegConfig(encoder="tiny", templates=4), weights=None).eval()
    keys = list(model.state_dict())
    text, visual = random_prompts(model, 12)
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        features = model.encode_image(images)
        eager = model(text=text, visual=visual, features=features)
        calls = []
        model.compile_decoder(backend=lambda gm, example: calls.append(gm) or gm.forward)
        compiled = model(text=text, visual=visual, features=features)
        chunked = model(text=text, visual=visual, features=features, class_chunk=5)
    assert calls  # the decoder went through dynamo's graph capture
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, eager, atol=1e-4, rtol=1e-4)
    assert list(model.state_dict()) == keys  # the compiled function is no submodule

    def refuse(*args, **kwargs):
        raise AssertionError("training must not decode through the compiled function")

    model.compiled_decoder = refuse
    model.train()
    assert model(text=text, visual=visual, features=model.encode_image(images)).shape == eager.shape
