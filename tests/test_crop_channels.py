"""crop_channels: prompt slots holding the image's own crop reach the decoder through weights of
their own. The slots are marked wherever crops are merged (pass II, crop-prompt training), the
marks travel with the prompts (per image, selected classes, chunks), and a model whose crop
weights equal its bank weights decodes marked slots exactly as unmarked ones."""

from __future__ import annotations

import pytest
import torch
from test_pass2 import _prompts as bank_prompts
from test_pass2 import _ref

from dpseg.errors import UserError
from dpseg.model import DPSegConfig, build_dpseg
from dpseg.model.cost_volume import crop_channels
from dpseg.model.decoder import DecoderState
from dpseg.model.prompts import VisualPrompts
from dpseg.model.summary import random_prompts
from dpseg.refine import (
    RefineSettings,
    add_classes,
    refine_batch,
    replace_prompts,
    select_classes,
)


def _prompts():
    return bank_prompts(n=4)


# ---- the marks ------------------------------------------------------------------------------
def test_bank_prompts_carry_no_marks_and_a_per_image_copy_marks_nothing():
    visual = _prompts()
    assert visual.crops is None
    copy = visual.per_image(2)
    assert copy.crops.shape == (2, 4, 4) and copy.crops.dtype == torch.bool and not copy.crops.any()


def test_each_merge_marks_exactly_the_slots_it_gave_to_crops():
    visual = _prompts()
    refs = [_ref([1, 3]), _ref([])]
    full = replace_prompts(visual, refs)
    expected = torch.zeros(2, 4, 4, dtype=torch.bool)
    expected[0, [1, 3]] = True
    assert torch.equal(full.crops, expected)
    mix = replace_prompts(visual, refs, "mix", 0.5)
    changed = (mix.embedding != visual.embedding.expand(2, -1, -1, -1)).any(dim=-1)
    assert torch.equal(mix.crops, changed) and int(mix.crops.sum()) == 4  # 2 classes x half of 4 slots
    assert torch.equal(replace_prompts(visual, refs, "blend", 0.3).crops, expected)
    again = replace_prompts(mix, [_ref([0]), _ref([2])], "mix", 0.5)  # marks accumulate, never reset
    assert torch.equal(again.crops[0, [1, 3]], mix.crops[0, [1, 3]]) and again.crops[1, 2].sum() == 2


def test_added_crop_copies_are_marked_and_selected_classes_keep_their_marks():
    visual = _prompts()
    _, added, owners = add_classes(None, visual, _ref([0, 2]))
    assert owners.tolist() == [0, 2]
    assert not added.crops[0, :4].any() and added.crops[0, 4:].all()
    mixed = replace_prompts(visual, [_ref([1]), _ref([2, 3])], "mix", 0.5)
    index = torch.tensor([[1, 2], [0, 3]])
    _, picked = select_classes(None, mixed, index)
    assert torch.equal(picked.crops, torch.stack([mixed.crops[0, [1, 2]], mixed.crops[1, [0, 3]]]))
    assert torch.equal(mixed.select(slice(1, 3)).crops, mixed.crops[:, 1:3])


# ---- the cost volume ------------------------------------------------------------------------
def test_crop_channels_split_the_visual_slots_into_bank_and_crop_shares():
    torch.manual_seed(0)
    cost = torch.randn(2, 6, 3, 4, 4)  # concat-costs: 3 text channels, then 3 visual
    marks = torch.rand(2, 3, 3) < 0.5  # (B, N, M)
    out = crop_channels(cost, marks, 3)
    assert out.shape == (2, 9, 3, 4, 4)
    torch.testing.assert_close(out[:, :3], cost[:, :3])  # text costs untouched
    for b in range(2):
        for n in range(3):
            for m in range(3):
                bank, crop = out[b, 3 + m, n], out[b, 6 + m, n]
                marked = bool(marks[b, n, m])
                torch.testing.assert_close(crop if marked else bank, cost[b, 3 + m, n])
                assert not (bank if marked else crop).any()
    unmarked = crop_channels(cost, None, 3)
    torch.testing.assert_close(unmarked, crop_channels(cost, torch.zeros_like(marks), 3))


def test_crop_channels_is_a_setting_of_visual_prompts_with_its_own_width_and_off_for_text():
    assert DPSegConfig(encoder="tiny", templates=4, crop_channels=True).cost_channels == 8
    assert DPSegConfig(encoder="tiny", templates=4, crop_channels=True, fusion="concat-costs").cost_channels == 12
    assert DPSegConfig(encoder="tiny", templates=4).cost_channels == 4
    # text prompts have no visual slots: the setting is off there, so a profile's default cannot break a text run
    text = DPSegConfig(encoder="tiny", templates=4, prompt_mode="text", visual_guidance="none", crop_channels=True)
    assert not text.crop_channels and text.cost_channels == 4
    with pytest.raises(UserError, match="crop_channels is true or false, got 'yes'"):
        DPSegConfig(encoder="tiny", templates=4, crop_channels="yes")


# ---- the model ------------------------------------------------------------------------------
def _model(**overrides):
    torch.manual_seed(0)
    cfg = DPSegConfig(encoder="tiny", templates=2, crop_channels=True, **overrides)
    return build_dpseg(cfg, weights=None).eval()


def _pass_two(model, share=0.5):
    torch.manual_seed(3)
    images = torch.rand(2, 3, 64, 64)
    text, visual = random_prompts(model, 5)
    detect = (torch.arange(64) * 5 // 64).view(1, 64, 1).expand(2, 64, 64).clone()
    with torch.inference_mode():
        features = model.encode_image(model.image_encoder.normalize(images))
        refs = refine_batch(model, images, detect, RefineSettings(64, min_area=1, merge="mix", share=share))
    return text, visual, replace_prompts(visual, refs, "mix", share), features


def _share_bank_weights(model):
    """Make every crop weight a copy of its bank weight."""
    m = model.cfg.templates
    with torch.no_grad():
        model.decoder.cost_embed.weight[:, -m:] = model.decoder.cost_embed.weight[:, -2 * m : -m]
        for guidance in model.decoder.guidance.values():
            guidance.crop_weight.copy_(guidance.weight)


@pytest.mark.parametrize("fusion", ["avg-embeddings", "concat-costs"])
def test_with_the_bank_weights_copied_marked_slots_decode_as_unmarked_ones(fusion):
    model = _model(fusion=fusion)
    _share_bank_weights(model)
    text, _, refined, features = _pass_two(model)
    unmarked = VisualPrompts(refined.embedding, refined.pooled)
    with torch.inference_mode():
        expected = model(text=text, visual=unmarked, features=features)
        got = model(text=text, visual=refined, features=features)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_marks_reach_the_decoder_and_chunks_decode_them_as_one_pass():
    model = _model()
    text, visual, refined, features = _pass_two(model)
    with torch.inference_mode():
        marked = model(text=text, visual=refined, features=features)
        unmarked = model(text=text, visual=VisualPrompts(refined.embedding, refined.pooled), features=features)
        chunked = model(text=text, visual=refined, features=features, class_chunk=2)
        bank = model(text=text, visual=visual, features=features)
        bank_per_image = model(text=text, visual=visual.per_image(2), features=features)
    assert not torch.allclose(marked, unmarked, rtol=1e-3, atol=1e-3)  # crop weights of their own
    torch.testing.assert_close(chunked, marked, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bank_per_image, bank, rtol=1e-4, atol=1e-5)  # no marks: pass I unchanged


def test_a_model_without_crop_channels_ignores_the_marks():
    torch.manual_seed(0)
    model = build_dpseg(DPSegConfig(encoder="tiny", templates=2), weights=None).eval()
    text, _, refined, features = _pass_two(model)
    assert not any("crop_weight" in name for name, _ in model.named_parameters())
    with torch.inference_mode():
        marked = model(text=text, visual=refined, features=features)
        unmarked = model(text=text, visual=VisualPrompts(refined.embedding, refined.pooled), features=features)
    torch.testing.assert_close(marked, unmarked, rtol=0, atol=0)


def test_early_rejection_keeps_the_marks_of_the_classes_it_keeps():
    model = _model(class_reject_topk=2)
    text, _, refined, features = _pass_two(model)
    unmarked = VisualPrompts(refined.embedding, refined.pooled)
    with torch.inference_mode():
        marked_own = model(text=text, visual=refined, features=features)
        unmarked_own = model(text=text, visual=unmarked, features=features)
        _share_bank_weights(model)
        marked_shared = model(text=text, visual=refined, features=features)
        unmarked_shared = model(text=text, visual=unmarked, features=features)
    kept = marked_shared > -1e3
    assert kept.any() and not kept.all()  # rejection dropped some classes
    torch.testing.assert_close(marked_shared, unmarked_shared, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(marked_own, unmarked_own, rtol=1e-3, atol=1e-3)
    state = DecoderState(torch.zeros(2, 5, 1, 1, 1), None, None, {}, refined.crops)
    keep = torch.tensor([4, 1])
    assert torch.equal(state.select(keep).crops, refined.crops[:, [4, 1]])


def test_fast_pass_two_of_every_class_is_the_exact_pass_two_with_crop_channels():
    from dpseg.model import PassContext
    from pipeline.evaluate.loop import fast_pass2

    model = _model()
    torch.manual_seed(3)
    images = torch.rand(2, 3, 64, 64)
    text, visual = random_prompts(model, 5)
    refine = RefineSettings(64, min_area=1, merge="mix", share=0.5)
    detect = (torch.arange(64) * 5 // 64).view(1, 64, 1).expand(2, 64, 64).clone()
    every = torch.arange(5).repeat(2, 1)
    with torch.inference_mode():
        features = model.encode_image(model.image_encoder.normalize(images))
        context = PassContext()
        model(text=text, visual=visual, features=features, context_out=context)
        refs = refine_batch(model, images, detect, refine)
        exact = model(text=text, visual=replace_prompts(visual, refs, "mix", 0.5), features=features)
        fast = fast_pass2(model, text, visual, features, refs, refine, every, None, context)
    torch.testing.assert_close(fast, exact, rtol=1e-4, atol=1e-5)


def test_crop_prompt_training_marks_the_slots_it_gives_to_ground_truth_crops():
    from pipeline.train.loop import crop_prompt_visual

    model = _model()
    _, visual = random_prompts(model, 4)
    images = torch.rand(2, 3, 64, 64)
    labels = torch.full((2, 64, 64), 255)
    labels[0, :32] = 1  # image 0 holds class 1 only; image 1 is all ignored
    out = crop_prompt_visual(model, images, labels, visual, 0.5, 64, 255)
    assert out.crops[0, 1].tolist() == [False, True] and int(out.crops.sum()) == 1
    changed = (out.embedding != visual.embedding.expand(2, -1, -1, -1)).any(dim=-1)
    assert torch.equal(out.crops, changed)


def test_a_crop_channels_checkpoint_round_trips(tmp_path):
    from dpseg.model import load_dpseg, save_dpseg

    model = _model()
    text, _, refined, features = _pass_two(model)
    loaded = load_dpseg(save_dpseg(model, tmp_path / "ckpt", trainable_only=False)).eval()
    assert loaded.cfg.crop_channels
    with torch.inference_mode():
        torch.testing.assert_close(
            loaded(text=text, visual=refined, features=features), model(text=text, visual=refined, features=features)
        )
