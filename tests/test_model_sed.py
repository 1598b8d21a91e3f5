"""Issue 8: SED's aux heads and deep supervision, early rejection, pooled class attention,
guidance switches, image-tower regularisation, prompt encode size, config version."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import first_conv

from dpseg.clip import ENCODERS
from dpseg.errors import UserError
from dpseg.model import (
    CONFIG_VERSION,
    DPSegConfig,
    build_dpseg,
    deep_supervision_bce,
    load_dpseg,
    read_checkpoint_config,
    save_dpseg,
    segmentation_bce,
)
from dpseg.model.decoder import REJECTED_LOGIT, kept_classes
from dpseg.model.summary import model_summary, random_prompts


def tiny_model(seed=0, **cfg):
    torch.manual_seed(seed)
    return build_dpseg(DPSegConfig(encoder="tiny", **cfg), weights=None).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def inputs(model):
    torch.manual_seed(1)
    text, visual = random_prompts(model, 6)
    with torch.no_grad():
        features = model.encode_image(torch.randn(2, 3, 64, 64))
    return text, visual, features


# ---- aux heads and deep supervision ----------------------------------------------------------


def test_aux_heads_are_3x3_class_heads_at_strides_32_16_8(model, inputs):
    text, visual, features = inputs
    with torch.no_grad():
        logits, aux = model(text=text, visual=visual, features=features, aux=True)
    assert [tuple(a.shape) for a in aux] == [(2, 6, 2, 2), (2, 6, 4, 4), (2, 6, 8, 8)]
    assert logits.shape == (2, 6, 16, 16)
    # Conv2d(C, 1, 3): 9 C weights + 1 bias, on the cost embedding (128) and stage outputs (64, 32)
    assert [sum(p.numel() for p in h.parameters()) for h in model.decoder.aux_heads] == [
        9 * 128 + 1,
        9 * 64 + 1,
        9 * 32 + 1,
    ]
    with torch.no_grad():
        assert torch.equal(model(text=text, visual=visual, features=features), logits)  # aux does not change logits


def test_without_deep_supervision_there_are_no_aux_heads():
    plain = tiny_model(deep_supervision=False)
    assert plain.decoder.aux_heads is None
    text, visual = random_prompts(plain, 3)
    with torch.no_grad():
        _, aux = plain(torch.randn(1, 3, 64, 64), text=text, visual=visual, aux=True)
    assert aux == []


def test_deep_supervision_loss_is_the_sum_of_four_independent_bces():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 32, 32))
    labels[0, :5] = 255
    outputs = [torch.randn(2, 4, s, s) for s in (8, 1, 2, 4)]  # final at stride 4, aux at 32/16/8

    def bce(lg):  # by hand: upsample, one-hot with the ignore rows all-zero, mean over everything
        up = F.interpolate(lg, size=(32, 32), mode="bilinear", align_corners=False)
        target = torch.zeros_like(up)
        for b in range(2):
            for y in range(32):
                for x in range(32):
                    if labels[b, y, x] != 255:
                        target[b, labels[b, y, x], y, x] = 1
        p = torch.sigmoid(up.double())
        return -(target * p.log() + (1 - target) * (1 - p).log()).mean()

    expected = sum(bce(o) for o in outputs)
    got = deep_supervision_bce(outputs[0], outputs[1:], labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = segmentation_bce(outputs[0], labels).item()
    assert deep_supervision_bce(outputs[0], [], labels).item() == pytest.approx(plain)


# ---- early rejection ----------------------------------------------------------------------


@pytest.fixture
def rejecting(model):
    """The shared model with cfg.class_reject_topk set for one test (decoding reads it per call)."""

    def set_k(k):
        model.cfg.class_reject_topk = k
        return model

    yield set_k
    model.cfg.class_reject_topk = None
    model.eval()


def test_early_rejection_with_k_equal_to_n_is_the_plain_path(model, inputs, rejecting):
    text, visual, features = inputs
    with torch.no_grad():
        a, aux_a = model(text=text, visual=visual, features=features, aux=True)
        b, aux_b = rejecting(6)(text=text, visual=visual, features=features, aux=True)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(aux_a, aux_b, strict=True))


def test_early_rejection_drops_classes_outside_every_pixels_top_k(inputs, rejecting):
    text, visual, features = inputs
    model = rejecting(1)
    with torch.no_grad():
        logits, aux = model(text=text, visual=visual, features=features, aux=True)
    # the first head sees every class; a class survives only if it is the top-1 somewhere
    first = aux[0]
    survivors = set(first.argmax(dim=1).unique().tolist())
    assert set(kept_classes(first, 1).tolist()) == survivors
    rejected = [c for c in range(6) if c not in survivors]
    assert rejected, "the random prompts should leave some class out of every pixel's top 1"
    assert (logits[:, rejected] == REJECTED_LOGIT).all() and (aux[1][:, rejected] == REJECTED_LOGIT).all()
    final = {c for c in range(6) if (logits[:, c] != REJECTED_LOGIT).any()}
    assert final and final <= survivors
    model.train()  # training never rejects (SED's fast inference is an eval option)
    with torch.no_grad():
        assert (model(text=text, visual=visual, features=features) != REJECTED_LOGIT).all()


def test_kept_classes_follows_seds_rule():
    aux = torch.tensor([[[[0.0]], [[2.0]], [[1.0]], [[-1.0]]], [[[3.0]], [[0.0]], [[1.0]], [[-1.0]]]])  # (2, 4, 1, 1)
    assert kept_classes(aux, 1).tolist() == [0, 1]  # top-1 of image 1 is class 1, of image 2 class 0
    assert kept_classes(aux, 2).tolist() == [0, 1, 2]
    assert kept_classes(aux, 9).tolist() == [0, 1, 2, 3]


def test_rejection_needs_the_aux_heads():
    with pytest.raises(UserError, match="needs deep_supervision on"):
        DPSegConfig(encoder="tiny", class_reject_topk=5, deep_supervision=False)


# ---- class attention pooling, guidance switches -------------------------------------------


def test_class_attention_is_pooled_in_training_only(model, inputs):
    text, visual, features = inputs
    assert [b.pool for b in model.decoder.blocks] == [1, 1, 1]
    try:
        model.train()
        assert [b.pool for b in model.decoder.blocks] == [2, 2, 2]
        with torch.no_grad():
            trained = model(text=text, visual=visual, features=features)
            chunked = model(text=text, visual=visual, features=features, class_chunk=4)
    finally:
        model.eval()
    with torch.no_grad():
        evaluated = model(text=text, visual=visual, features=features)
    assert torch.allclose(trained, chunked, atol=1e-5)  # chunking stays exact with pooling
    assert not torch.allclose(trained, evaluated)


def test_guidance_switches_change_the_network_and_its_output(inputs):
    text, visual, features = inputs
    outs = {}
    for name, cfg in {
        "all": {},
        "no_stage1": {"guidance_stages": (True, False, True)},
        "none": {"visual_guidance": "none"},
    }.items():
        m = tiny_model(seed=4, **cfg)
        with torch.no_grad():
            outs[name] = m(text=text, visual=visual, features=features)
        outs[name + "_guided"] = [f.from_guidance is not None for f in m.decoder.fusions]
    assert outs["all_guided"] == [True, True, True]
    assert outs["no_stage1_guided"] == [True, False, True]
    assert outs["none_guided"] == [False, False, False]
    assert not torch.allclose(outs["all"], outs["no_stage1"]) and not torch.allclose(outs["all"], outs["none"])


def test_text_only_without_guidance_needs_no_visual_prompts():
    m = tiny_model(prompt_mode="text", visual_guidance="none")
    text, _ = random_prompts(m, 3)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 64), text=text).shape == (1, 3, 16, 16)


def test_summary_lists_aux_heads_fusion_blocks_and_the_cost_chain():
    info = model_summary(DPSegConfig(encoder="tiny", visual_guidance="upsampled-cost"), num_classes=3, size=64)
    assert [h["stride"] for h in info["aux_heads"]] == [32, 16, 8]
    assert [h["in_channels"] for h in info["aux_heads"]] == [128, 64, 32]
    assert [
        (f["in_channels"], f["deconv_channels"], f["skip_channels"], f["guidance_channels"], f["out_channels"])
        for f in info["fusion_blocks"]
    ] == [(128, 96, 32, 32, 64), (64, 48, 16, 16, 32), (32, 24, 8, 8, 16)]
    assert [f["groupnorm_groups"] for f in info["fusion_blocks"]] == [4, 2, 1]
    assert info["cost_chain"] == [[80, 32, 2, 2], [32, 16, 2, 2], [16, 8, 2, 2]]  # ConvTranspose2d (in, out, k, k)


# ---- image tower regularisation, prompt encode size ----------------------------------------


def test_drop_path_and_head_dropout_are_set_from_seds_values():
    assert (ENCODERS.get("convnext-b").drop_path, ENCODERS.get("convnext-b").head_dropout) == (0.0, 0.0)
    assert (ENCODERS.get("convnext-l").drop_path, ENCODERS.get("convnext-l").head_dropout) == (0.1, 0.1)
    cfg = DPSegConfig(encoder="tiny")
    assert (cfg.drop_path, cfg.head_dropout) == (0.0, 0.0)
    m = tiny_model(drop_path=0.2, head_dropout=0.3)
    assert m.image_encoder.regularization() == pytest.approx({"drop_path": 0.2, "head_dropout": 0.3})
    assert m.prompt_encoder.regularization() == {"drop_path": 0.0, "head_dropout": 0.0}  # frozen copy: untouched
    with pytest.raises(UserError, match="drop_path must be in"):
        DPSegConfig(encoder="tiny", drop_path=1.5)


def test_prompt_images_are_encoded_at_the_segmenter_input_size_by_default(model):
    spec = model.encoder_spec
    assert model.prompt_encoder.image_size == spec.image_size != spec.prompt_size
    images = torch.rand(2, 3, 40, 40)
    tower = model.prompt_encoder
    for size in (None, spec.prompt_size):
        embedding, pooled = model.encode_prompt_images(images, size=size)
        at = size or spec.image_size
        resized = F.interpolate(images, size=(at, at), mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            expected = tower.encode_prompts(tower.normalize(resized), (16, 8, 4))
        assert torch.allclose(embedding, expected.embedding, atol=1e-5)
        assert all(torch.allclose(pooled[s], expected.pooled[s], atol=1e-5) for s in (4, 8, 16))


def test_random_towers_do_not_depend_on_the_callers_seed():
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    assert torch.equal(first_conv(a.prompt_encoder).weight, first_conv(b.prompt_encoder).weight)
    assert not torch.equal(a.decoder.head.weight, b.decoder.head.weight)


# ---- checkpoints ---------------------------------------------------------------------------


def test_trainable_only_checkpoint_rebuilds_and_checks_the_frozen_towers(tmp_path, inputs):
    text, visual, features = inputs
    m = tiny_model(seed=5)
    with torch.no_grad():
        first_conv(m.image_encoder).weight.add_(0.5)  # "trained": differs from the prompt tower now
    small = save_dpseg(m, tmp_path / "small")
    full = save_dpseg(m, tmp_path / "full", trainable_only=False)
    assert (small / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size / 2
    assert read_checkpoint_config(small)["stored"] == "trainable"
    for path in (small, full):
        loaded = load_dpseg(path).eval()
        images = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(loaded(images, text=text, visual=visual), m(images, text=text, visual=visual))
        pairs = zip(loaded.state_dict().values(), m.state_dict().values(), strict=True)
        assert all(torch.equal(x, y) for x, y in pairs)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "frozen_towers_id": "0" * 32}))
    with pytest.raises(UserError, match="are not the ones .* was trained with"):
        load_dpseg(small)


def test_a_checkpoint_of_the_previous_network_is_refused_naming_the_config_version(tmp_path):
    path = save_dpseg(tiny_model(), tmp_path / "old")
    config = json.loads((path / "config.json").read_text())
    del config["config_version"]  # what a checkpoint saved before issue 8 looks like
    config["model"].pop("config_version")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        load_dpseg(path)
    message = str(err.value)
    assert "\n" not in message
    assert f"saved with model config version 1; this dpseg builds config version {CONFIG_VERSION}" in message
