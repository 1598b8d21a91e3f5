"""Prompt refinement: detection, the crop of a known mask, connected components, and that pass II's
prompts differ from the bank's exactly in the detected classes of each image."""

from __future__ import annotations

import pytest
import torch

from dpseg.errors import UserError
from dpseg.model import DPSegConfig, build_dpseg
from dpseg.model.prompts import VisualPrompts
from dpseg.refine import (
    RefineSettings,
    crop_masked,
    detect,
    largest_components,
    refine_batch,
    replace_prompts,
    slot_indices,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_dpseg(DPSegConfig(encoder="tiny", templates=4), weights=None).eval()


def test_detect_keeps_classes_with_at_least_min_area_pixels():
    pred = torch.zeros(10, 10, dtype=torch.int64)
    pred[:2, :5] = 3  # 10 pixels
    pred[5, 5] = 4  # 1 pixel
    ids, areas = detect(pred, 6, min_area=2)
    assert ids.tolist() == [0, 3] and areas.tolist() == [89, 10]
    ids, areas = detect(pred, 6, min_area=0)  # 0 still means "owns a pixel"
    assert ids.tolist() == [0, 3, 4] and areas.tolist() == [89, 10, 1]


def test_crop_of_a_known_mask_is_the_expected_pixels():
    image = torch.arange(3 * 6 * 7, dtype=torch.float32).view(3, 6, 7) / 200
    mask = torch.zeros(6, 7, dtype=torch.bool)
    mask[1:4, 2:5] = True  # bounding box rows 1..3, cols 2..4 ...
    mask[1, 2] = False  # ... with one pixel of it outside the mask
    fill = torch.tensor([0.1, 0.2, 0.3])
    crop = crop_masked(image, mask, size=3, fill=fill)  # box is 3x3: no resampling
    want = image[:, 1:4, 2:5].clone()
    want[:, 0, 0] = fill
    torch.testing.assert_close(crop, want)
    bbox = crop_masked(image, mask, size=3, fill=None)  # crop "bbox": the pixels stay
    torch.testing.assert_close(bbox, image[:, 1:4, 2:5])
    resized = crop_masked(image, mask, size=8, fill=fill)
    assert resized.shape == (3, 8, 8)


def test_largest_components_are_ordered_by_size():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0:2, 0:2] = True  # 4 px
    mask[4:8, 4:7] = True  # 12 px
    mask[0, 6] = mask[1, 7] = True  # diagonal neighbours: one 8-connected component of 2
    comps = largest_components(mask, 5)
    assert [int(c.sum()) for c in comps] == [12, 4, 2]
    assert bool(comps[0][5, 5]) and not bool(comps[0][0, 0])
    assert len(largest_components(mask, 2)) == 2


def test_slots_take_crops_round_robin():
    rows = slot_indices(torch.tensor([1, 3, 2]), templates=4)
    assert rows.tolist() == [[0, 0, 0, 0], [1, 2, 3, 1], [4, 5, 4, 5]]


def test_replace_changes_exactly_the_detected_classes_of_each_image(model):
    torch.manual_seed(1)
    n, m, d = 5, 4, model.prompt_encoder.embed_dim
    visual = VisualPrompts(
        torch.randn(n, m, d), {s: torch.randn(n, m, model.prompt_encoder.channels_at(s)) for s in (4, 8, 16)}
    )
    images = torch.rand(2, 3, 64, 64)
    preds = torch.zeros(2, 64, 64, dtype=torch.int64)
    preds[0, 10:30, 5:40] = 2
    preds[0, 40:60, 40:60] = 4
    preds[1] = 3
    settings = RefineSettings(encode_size=64, min_area=16)
    refs = refine_batch(model, images, preds, settings)
    assert [r.classes.tolist() for r in refs] == [[0, 2, 4], [3]]
    assert refs[0].areas.tolist() == [64 * 64 - 700 - 400, 700, 400]
    out = replace_prompts(visual, refs)
    assert out.embedding.shape == (2, n, m, d)
    for b, ref in enumerate(refs):
        detected = set(ref.classes.tolist())
        for c in range(n):
            changed = not torch.equal(out.embedding[b, c], visual.embedding[c])
            assert changed == (c in detected), (b, c)
            for s in (4, 8, 16):
                assert (not torch.equal(out.pooled[s][b, c], visual.pooled[s][c])) == (c in detected)
        for k, c in enumerate(ref.classes.tolist()):  # one crop per class fills all M slots
            assert torch.equal(out.embedding[b, c], ref.embedding[k].expand(m, d))
    assert torch.equal(visual.embedding, visual.embedding.clone())  # the bank's prompts untouched


def test_refined_features_are_the_prompt_tower_on_the_masked_crop(model):
    torch.manual_seed(2)
    images = torch.rand(1, 3, 64, 64)
    preds = torch.zeros(1, 64, 64, dtype=torch.int64)
    preds[0, 8:24, 16:48] = 1
    ref = refine_batch(model, images, preds, RefineSettings(encode_size=32, min_area=1))[0]
    tower = model.prompt_encoder
    fill = tower.mean.view(3)
    crop = images[0, :, 8:24, 16:48]  # the box is the mask: no fill inside
    crop = torch.nn.functional.interpolate(
        crop[None], size=(32, 32), mode="bilinear", antialias=True, align_corners=False
    )
    with torch.no_grad():
        want = tower.encode_prompts(tower.normalize(crop))
    torch.testing.assert_close(ref.embedding[1], want.embedding[0].half().float())
    torch.testing.assert_close(ref.pooled[8][1], want.pooled[8][0].half().float())
    # class 0 surrounds the box: its crop is the whole image with the box at the mean colour,
    # which normalises to exactly zero
    whole = images[0].clone()
    whole[:, 8:24, 16:48] = fill.view(3, 1, 1)
    assert torch.allclose(tower.normalize(whole[None])[0, :, 8:24, 16:48], torch.zeros(3, 16, 32), atol=1e-6)


def test_instances_give_one_crop_per_component(model):
    images = torch.rand(1, 3, 64, 64)
    preds = torch.zeros(1, 64, 64, dtype=torch.int64)
    preds[0, 0:10, 0:10] = 1
    preds[0, 30:50, 30:50] = 1
    preds[0, 60:62, 60:62] = 1
    ref = refine_batch(model, images, preds, RefineSettings(encode_size=32, min_area=1, instances=2))[0]
    assert ref.classes.tolist() == [0, 1] and ref.counts.tolist() == [1, 2] and ref.embedding.shape[0] == 3


def test_bad_settings_are_one_line_errors():
    with pytest.raises(UserError, match="crop 'box' is not one of masked, bbox"):
        RefineSettings(encode_size=64, crop="box")
    with pytest.raises(UserError, match="min_area"):
        RefineSettings(encode_size=64, min_area=-1)
